"""The rendered JobSet's command really starts a multi-node run, survives preemption, and resumes.

The pods run as local process groups from the rendered command and environment
(``tests/k8s_pods.py`` plays the controllers).  ``tests/test_k8s_failures.py``
covers what each kind of failure costs.

* Preemption: SIGTERM to one pod's PID 1 (the entrypoint), as the kubelet
  sends it; both pods must end with status 75 (what the podFailurePolicy
  turns into a free restart) after a committed final checkpoint, and the
  restarted group must repeat, step for step, the losses of an uninterrupted
  run.
* Node loss: SIGKILL of one pod, then the group restarted the way the
  failure policy does (BlockingRecreate): training continues after the
  latest checkpoint.
"""

from __future__ import annotations

import time

import pytest

from jobs.k8s.exitcodes import PREEMPTED as PREEMPTED_EXIT_CODE
from tests.k8s_pods import committed_steps, local_pods, metric_steps, wait_for
from tests.k8s_support import run_toml


def _losses(rows: list[dict]) -> dict[int, float]:
    return {m["step"]: m["loss_metrics/global_avg_loss"] for m in rows}


@pytest.mark.slow
def test_sigterm_to_one_pod_saves_exits_75_and_the_restart_repeats_an_uninterrupted_run(tmp_path):
    # Never finishes on its own; no periodic checkpoint in reach (torchtitan's interval is 500),
    # so a committed checkpoint can only come from the preemption save.
    config = tmp_path / "preempt.toml"
    config.write_text(run_toml(steps=100_000) + "[metrics]\nlog_freq = 1\n")
    pods = local_pods(tmp_path, config, "preempt")
    ckpt, metrics = pods.runs / "preempt" / "checkpoint", pods.runs / "preempt" / "metrics.jsonl"
    try:
        pods.start(generation=1)
        wait_for(lambda: len(metric_steps(metrics)) >= 3, pods, "three training steps")
        # The kubelet SIGTERMs one pod (its node is reclaimed); the other learns of it from the
        # trainer's per-step agreement.  Both must be done within the pod's grace period.
        pods.sigterm_pod(1)
        assert pods.wait_all(pods.grace_s) == [PREEMPTED_EXIT_CODE] * 2, pods.output()
        gen1 = metric_steps(metrics)
        stopped = gen1[-1]["step"]
        assert committed_steps(ckpt) == [stopped], f"the final save of step {stopped} must be committed"
        assert "workers stopped for preemption" in pods.logs[1].read_text()

        # The JobSet restarts the group (the exit code 75 rule); same command, same volume.
        pods.start(generation=2)
        wait_for(lambda: len(metric_steps(metrics)) >= len(gen1) + 3, pods, "three steps of the restarted group")
        resumed = metric_steps(metrics)[len(gen1):][:3]
    finally:
        pods.terminate_all()
    assert [m["step"] for m in resumed] == [stopped + 1, stopped + 2, stopped + 3]

    # The same rendered run, never interrupted, is the reference.
    reference = local_pods(tmp_path, config, "reference")
    ref_metrics = reference.runs / "reference" / "metrics.jsonl"
    try:
        reference.start(generation=1)
        wait_for(lambda: len(metric_steps(ref_metrics)) >= stopped + 3, reference, "the reference run")
    finally:
        reference.terminate_all()
    expected = _losses(metric_steps(ref_metrics))
    assert _losses(gen1) == {step: expected[step] for step in range(1, stopped + 1)}
    assert _losses(resumed) == {step: expected[step] for step in range(stopped + 1, stopped + 4)}


@pytest.mark.slow
def test_rendered_jobset_rendezvous_trains_and_resumes_after_losing_a_node(tmp_path):
    # Never finishes on its own (the test stops it); a full checkpoint every 3 steps.
    config = tmp_path / "wire.toml"
    config.write_text(run_toml(steps=100_000, checkpoint="interval = 3") + "[metrics]\nlog_freq = 1\n")
    pods = local_pods(tmp_path, config, "wire")
    run_dir = pods.runs / "wire"
    ckpt, metrics = run_dir / "checkpoint", run_dir / "metrics.jsonl"
    try:
        # Generation 1: both pods rendezvous through the "leader" and train to a committed checkpoint.
        pods.start(generation=1)
        wait_for(lambda: ckpt.is_dir() and committed_steps(ckpt), pods, "a committed checkpoint")
        gen1_text = "\n".join(p.read_text(errors="replace") for p in pods.logs)
        assert "world 2" in gen1_text, "the two pods must form one world of 2 ranks"

        # A node is lost; the JobSet recreates the group: old pods all gone before new ones start.
        pods.kill_pod(1)
        pods.terminate_all()
        latest = max(committed_steps(ckpt))
        gen1_loss = {m["step"]: m["loss_metrics/global_avg_loss"] for m in metric_steps(metrics)}

        # Generation 2: same command, same volume: training continues after the checkpoint.
        # Its records are told apart by time: gen 1 may have logged steps past the checkpoint,
        # which the restart drops from metrics.jsonl (they were never checkpointed).
        restarted_at = time.time()
        pods.start(generation=2)

        def restarted_steps():
            new = [m for m in metric_steps(metrics) if m["time"] > restarted_at]
            return new[:2] if len(new) >= 2 else None

        new = wait_for(restarted_steps, pods, "two training steps of the restarted group")
        assert [m["step"] for m in new] == [latest + 1, latest + 2], (
            f"expected the restart to resume after checkpoint step-{latest}:\n{pods.output()}"
        )
        steps = [m["step"] for m in metric_steps(metrics)]
        assert steps == list(range(1, len(steps) + 1)), f"one record per step, in order: {steps}"
        if latest + 1 in gen1_loss:
            # The first generation got past the checkpoint too: a faithful resume repeats its loss.
            assert new[0]["loss_metrics/global_avg_loss"] == pytest.approx(gen1_loss[latest + 1], rel=1e-4)
    finally:
        pods.terminate_all()
