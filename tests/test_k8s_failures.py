"""What each failure of a multi-node run costs: the pods' exit codes and what the rendered policies do with them.

The multi-pod test runs the rendered trainer pods as local process groups
(``tests/k8s_pods.py``) through four generations of one run, the way the
JobSet would restart it, and after each one evaluates the rendered Job
``podFailurePolicy`` and JobSet ``failurePolicy`` on the pods' real exit codes
(``tests/k8s_support.py`` follows the controllers' rules):

1. a whole pod is SIGKILLed after the run committed a checkpoint (a lost
   node): the survivor exits 76, a free restart;
2. a pod is SIGTERMed while its workers are still importing: 75, free, and
   the attempt does not count against the progress budget;
3. one worker is SIGKILLed (a rank fails on its own) with no checkpoint since
   the attempt started: 78 from its pod, 76 from the other, free restart but
   counted;
4. the next attempt starts at the same committed step with the budget (1)
   spent: both pods exit 77 before starting torchrun and the JobSet fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jobs.k8s import render_run
from jobs.k8s.attempts import RECORD, Budget
from jobs.k8s.exitcodes import (
    ATTEMPT_ENV,
    CHECKPOINT_DIR_ENV,
    CRASH_LOOP,
    CRASH_LOOP_LIMIT_ENV,
    IMAGE_NETWORK_ENV,
    NETWORK_ENV,
    PEER_LOST,
    PREEMPTED,
    RANK_FAILED,
    RUN_DIR_ENV,
)
from tests.k8s_pods import committed_steps, local_pods, metric_steps, wait_for
from tests.k8s_support import IMAGE, job_failure, jobset_action, load, run_toml, trainer_pod, write_config

FREE = "RestartJobSetAndIgnoreMaxRestarts"
EXIT_TIMEOUT_S = 120  # a survivor notices a lost peer in seconds; generous for a loaded machine


def _policies(jobset: dict) -> tuple[dict, dict]:
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    return job, jobset["spec"]["failurePolicy"]


def _verdict(jobset: dict, pod: str, code: int, conditions: tuple[str, ...] = ()) -> str:
    """What the JobSet does when this pod's failure is the first the Job controller sees."""
    job, failure_policy = _policies(jobset)
    failed = job_failure(job, pod, code, conditions)
    assert failed is not None, f"exit {code} must fail the Job (backoffLimit 0)"
    return jobset_action(failure_policy, *failed)


def test_rendered_policies_decide_each_exit_code(tmp_path):
    render_run(write_config(tmp_path), 2, 1, IMAGE, tmp_path / "out", name="pol")
    jobset = load(tmp_path / "out" / "jobset.yaml")
    for code in (PREEMPTED, PEER_LOST, RANK_FAILED):
        assert _verdict(jobset, "pol-node-0-1", code) == FREE, code
    assert _verdict(jobset, "pol-node-0-1", CRASH_LOOP) == "FailJobSet"
    # A lost node's pod: SIGKILL (137) plus the DisruptionTarget condition the node controller adds.
    assert _verdict(jobset, "pol-node-0-1", 137, ("DisruptionTarget",)) == FREE
    # What no pod explained counts against maxRestarts: the entrypoint crashed, a container OOM-kill, bad setup.
    for code in (1, 2, 137):
        assert _verdict(jobset, "pol-node-0-1", code) == "RestartJobSet", code
    # The crash-loop rule must outrank DisruptionTarget (a pod can carry both) and match on the code alone.
    assert _verdict(jobset, "pol-node-0-0", CRASH_LOOP, ("DisruptionTarget",)) == "FailJobSet"


def test_crash_loop_limit_reaches_the_entrypoint_and_is_checked(tmp_path, capsys):
    from jobs.k8s.cli import main as k8s_main

    argv = ["render", str(write_config(tmp_path)), "--nodes", "2", "--gpus-per-node", "1", "--image", IMAGE]
    assert k8s_main([*argv, "--out", str(tmp_path / "ok"), "--crash-loop-limit", "5"]) == 0
    (container,) = trainer_pod(load(tmp_path / "ok" / "jobset.yaml"))["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[CRASH_LOOP_LIMIT_ENV]["value"] == "5"
    assert env[RUN_DIR_ENV]["value"] == "/runs/tiny-moe"
    assert env[CHECKPOINT_DIR_ENV]["value"] == "/runs/tiny-moe/checkpoint"
    assert env[ATTEMPT_ENV]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['jobset.sigs.k8s.io/restart-attempt']"}}
    assert k8s_main([*argv, "--out", str(tmp_path / "bad"), "--crash-loop-limit", "0"]) != 0
    assert "--crash-loop-limit: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_progress_budget_counts_attempts_without_a_new_checkpoint(tmp_path):
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint"

    def budget(attempt: int) -> Budget:
        return Budget(run_dir, str(ckpt), limit=2, attempt=str(attempt))

    assert budget(0).start() == (0, [])
    assert budget(0).start() == (0, [])  # the other pod of the same attempt: counted once
    assert budget(1).start() == (0, ["0"])
    budget(1).forgive()  # preempted: not the run's fault
    assert budget(2).start() == (0, ["0"])
    assert budget(3).start() == (0, ["0", "2"]) and budget(3).exhausted(["0", "2"])
    # A committed checkpoint is progress: every earlier failure is forgotten.
    (ckpt / "step-5").mkdir(parents=True)
    (ckpt / "step-5" / "COMMITTED").write_text(json.dumps({"step": 5, "files": {}}))
    assert budget(4).start() == (5, [])
    assert json.loads((run_dir / RECORD).read_text()) == {"step": 5, "attempts": ["4"]}
    # A half-written checkpoint is not progress (the trainer would not resume from it).
    (ckpt / "step-10").mkdir()
    assert budget(5).start() == (5, ["4"])
    # A damaged record starts the count afresh instead of failing every pod.
    (run_dir / RECORD).write_text('{"step": 5, "attem')
    assert budget(6).start() == (5, [])


def test_entrypoint_runs_as_main_without_a_runtime_warning(tmp_path):
    """``python -m jobs.k8s.entrypoint`` must not find itself already imported (manifests.py used to)."""
    env = {**os.environ, NETWORK_ENV: "efa", IMAGE_NETWORK_ENV: "tcp", "PYTHONWARNINGS": "error::RuntimeWarning"}
    proc = subprocess.run([sys.executable, "-m", "jobs.k8s.entrypoint", "--standalone", "x.py"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # the setup error, reached without importing torch
    assert "RuntimeWarning" not in proc.stderr and "built with NETWORK=tcp" in proc.stderr


@pytest.mark.slow
def test_each_failure_gives_its_exit_code_and_the_policy_charges_only_a_crash_loop(tmp_path):
    config = tmp_path / "fail.toml"
    # Never finishes on its own; a committed checkpoint every 10 steps.
    config.write_text(run_toml(steps=100_000, checkpoint="interval = 10") + "[metrics]\nlog_freq = 1\n")
    pods = local_pods(tmp_path, config, "fail", crash_loop_limit=1)
    jobset = load(tmp_path / "manifests-fail" / "jobset.yaml")
    run_dir = pods.runs / "fail"
    ckpt, metrics, record = run_dir / "checkpoint", run_dir / "metrics.jsonl", run_dir / RECORD
    pod = ["fail-node-0-0", "fail-node-0-1"]
    times = {}
    try:
        # 1. A lost node after progress: the survivor says "peer lost".
        t0 = time.monotonic()
        pods.start(generation=1)
        wait_for(lambda: 10 in committed_steps(ckpt) and len(metric_steps(metrics)) >= 11, pods,
                 "a committed checkpoint at step 10 and step 11")
        times["1 start to step 11"] = time.monotonic() - t0
        t0 = time.monotonic()
        pods.kill_pod(1)
        assert pods.wait_pod(0, EXIT_TIMEOUT_S) == PEER_LOST, pods.output()
        times["1 node loss to survivor exit"] = time.monotonic() - t0
        assert "lost a peer" in pods.logs[0].read_text()
        assert _verdict(jobset, pod[0], PEER_LOST) == FREE

        def rows_since(since: float) -> list[dict]:  # the trainer's metrics.jsonl rows, by wall clock
            return [row for row in metric_steps(metrics) if row["time"] >= since]

        # 2. SIGTERM while the workers are still importing: a preemption, 75, not counted.
        t0, gen2 = time.monotonic(), time.time()
        pods.start(generation=2)
        wait_for(lambda: pods.workers(0) and pods.workers(1), pods, "the workers of both pods to start", 120)
        pods.sigterm_pod(1)
        assert pods.wait_pod(1, EXIT_TIMEOUT_S) == PREEMPTED, pods.output()
        times["2 SIGTERM during import to exit"] = time.monotonic() - t0
        assert _verdict(jobset, pod[1], PREEMPTED) == FREE
        # FailJob: the Job controller deletes the other pod (SIGTERM to its PID 1): a preemption there too.
        pods.sigterm_pod(0)
        assert pods.wait_pod(0, EXIT_TIMEOUT_S) == PREEMPTED, pods.output()
        assert rows_since(gen2) == [], "no step was trained"
        assert json.loads(record.read_text()) == {"step": 10, "attempts": []}, "a preemption is not counted"

        # 3. A worker dies on its own, before the next checkpoint: 78 there, 76 on the other pod.
        t0, gen3 = time.monotonic(), time.time()
        pods.start(generation=3)
        wait_for(lambda: rows_since(gen3), pods, "the resumed run's first step")
        times["3 start to first resumed step"] = time.monotonic() - t0
        assert rows_since(gen3)[0]["step"] == 11  # resumed after the checkpoint of step 10
        t0 = time.monotonic()
        pods.kill_worker(1)
        codes = [pods.wait_pod(0, EXIT_TIMEOUT_S), pods.wait_pod(1, EXIT_TIMEOUT_S)]
        times["3 worker crash to both exits"] = time.monotonic() - t0
        assert codes == [PEER_LOST, RANK_FAILED], pods.output()
        assert max(committed_steps(ckpt)) == 10, "the test needs an attempt without progress"
        for name, code in zip(pod, codes):
            assert _verdict(jobset, name, code) == FREE
        assert json.loads(record.read_text()) == {"step": 10, "attempts": ["2"]}

        # 4. The next attempt starts at the same step with the budget spent: a crash loop, the JobSet fails.
        t0, gen4 = time.monotonic(), time.time()
        pods.start(generation=4)
        codes = [pods.wait_pod(0, EXIT_TIMEOUT_S), pods.wait_pod(1, EXIT_TIMEOUT_S)]
        times["4 start to crash-loop exit"] = time.monotonic() - t0
        assert codes == [CRASH_LOOP, CRASH_LOOP], pods.output()
        assert "crash loop: attempts 2 all ended without a new committed checkpoint" in pods.logs[0].read_text()
        assert rows_since(gen4) == []
        for name in pod:
            assert _verdict(jobset, name, CRASH_LOOP) == "FailJobSet"
    finally:
        pods.terminate_all()
        print("timings (s):", {k: round(v, 1) for k, v in times.items()})


def test_worker_tells_a_lost_peer_from_its_own_failure(tmp_path, monkeypatch):
    import torch.distributed as dist

    from jobs.k8s.worker import lost_peer, main

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4711")
    nccl = dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:3356, remote process exited or there was a "
                                 "network error, NCCL version 2.27.3")
    for exc in (ConnectionResetError(104, "Connection reset by peer"), gloo, nccl,
                dist.DistNetworkError("failed to recv, got 0 bytes"), dist.DistStoreError("wait timeout")):
        assert lost_peer(exc), exc
    chained = ValueError("while reducing")
    chained.__cause__ = ConnectionResetError()
    assert lost_peer(chained)
    for exc in (ValueError("bad shape"), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                KeyError("tok_embeddings.weight"), dist.DistBackendError("NCCL error: unhandled cuda error")):
        assert not lost_peer(exc), exc

    # The wrapper itself: a module run as __main__, its status kept, a lost peer mapped to 76.
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, body in (("peer_gone", "raise ConnectionResetError(104, 'Connection reset by peer')"),
                       ("own_bug", "raise ValueError('bad shape')"),
                       ("preempted", "import sys\nif __name__ == '__main__':\n    sys.exit(75)")):
        (tmp_path / f"{name}.py").write_text(body + "\n")
    assert main(["peer_gone"]) == PEER_LOST
    with pytest.raises(ValueError, match="bad shape"):
        main(["own_bug"])
    with pytest.raises(SystemExit) as stopped:
        main(["preempted", "--flag"])
    assert stopped.value.code == PREEMPTED


def test_sigterm_while_waiting_at_the_rendezvous_exits_75_at_once(tmp_path):
    """Node rank 1 waits in C++ for pod 0's store; the SIGTERM must not wait for that to give up."""
    run_dir = tmp_path / "run"
    env = {**os.environ, RUN_DIR_ENV: str(run_dir), CHECKPOINT_DIR_ENV: str(run_dir / "checkpoint"),
           CRASH_LOOP_LIMIT_ENV: "3", ATTEMPT_ENV: "0"}
    with socket.socket() as s:  # a port nobody listens on: pod 0 never comes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "jobs.k8s.entrypoint", "--nnodes=2", "--nproc_per_node=1", "--node_rank=1",
            "--rdzv_backend=static", "--master_addr=127.0.0.1", f"--master_port={port}", "--rdzv_conf=timeout=300",
            "--max_restarts=0", "-m", "jobs.k8s.worker", "titan_moe.train"]
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        maps = f"/proc/{proc.pid}/maps"
        deadline = time.monotonic() + 180
        while "libtorch_python" not in open(maps).read():  # torch imported: torchrun is next
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(3)  # into the rendezvous wait
        proc.terminate()
        assert proc.wait(timeout=15) == PREEMPTED, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGTERM before any worker started" in log.read_text()
    assert json.loads((run_dir / RECORD).read_text()) == {"step": 0, "attempts": []}, "a preemption is not counted"
