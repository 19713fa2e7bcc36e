"""Which temporaries a rerun may delete: only those whose writer can never write again."""

import os
import subprocess
import sys
import time

import pytest

from titan_moe.common.temp_files import remove_dead_temp_files, writer_alive

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="zombie and start-time checks read /proc")


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_live_writer_keeps_its_file_and_a_dead_one_loses_it(tmp_path):
    live = sleeper()
    try:
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()  # reaped: the pid no longer exists
        kept = tmp_path / f"a.tokens.tmp-{live.pid}"
        stale = tmp_path / "sub" / f"b.tokens.tmp-{gone.pid}"
        staging = tmp_path / f"staging.tmp-{gone.pid}-x1"
        stale.parent.mkdir()
        kept.write_text("x")
        stale.write_text("x")
        staging.mkdir()
        (staging / "shard.mds").write_text("x")
        unrelated = tmp_path / "c.tokens"
        unrelated.write_text("x")
        removed = sorted(remove_dead_temp_files(str(tmp_path)))
        assert removed == sorted([str(stale), str(staging)])
        assert kept.exists() and unrelated.exists() and not staging.exists()
    finally:
        live.kill()
        live.wait()


@linux_only
def test_a_killed_unreaped_writer_is_dead():
    # SIGKILLed and never waited for: a zombie, which kill(pid, 0) still reports as existing.
    proc = sleeper()
    try:
        os.kill(proc.pid, 9)
        deadline, state = time.monotonic() + 10, None
        while state != "Z" and time.monotonic() < deadline:
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                pytest.skip("another SIGCHLD handler in this process reaped the child before it was seen as a zombie")
            time.sleep(0.01)
        assert state == "Z", f"the killed child never became a zombie (state {state})"
        os.kill(proc.pid, 0)  # a zombie still "exists" for kill(pid, 0)
        assert writer_alive(proc.pid, time.time()) is False
    finally:
        proc.wait()


@linux_only
def test_a_reused_pid_is_not_the_writer():
    proc = sleeper()
    try:
        now = time.time()
        # A file last written before this process existed was written by an earlier owner of the pid.
        assert writer_alive(proc.pid, now - 3600) is False
        # A file written while it runs may be its own.
        assert writer_alive(proc.pid, now) is True
    finally:
        proc.kill()
        proc.wait()
