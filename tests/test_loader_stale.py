"""A run killed with SIGKILL leaves shared memory and half-written cache files; the next run copes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.mds_streams import sample_tokens, write_prep_output
from titan_moe.data.manifest import read_prep_output
from titan_moe.data.shard_store import SHM_DIR, ShardStore, _registered_locals
from titan_moe.common.errors import ConfigError

SEQ = 32
REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from titan_moe.data.manifest import read_prep_output
    from titan_moe.data.shard_store import ShardStore

    root, starting, reading = sys.argv[1:4]
    prep = read_prep_output(root, field="data.root", seq_len=32)
    # Killed while starting: streaming's registration exists, no shard touched yet.
    first = ShardStore(prep, sorted(prep.streams), starting)
    # Killed while reading: shards cached, and what a kill mid-download leaves behind,
    # boto3's temporary file and a half-decompressed shard.
    second = ShardStore(prep, sorted(prep.streams), reading)
    second.read(np.array([0, 0, 1]), np.array([0, 17, 3]))
    open(f"{reading}/a/shard.00003.mds.zstd.3f9a1c2b", "wb").write(b"partial")
    open(f"{reading}/b/shard.00001.mds.tmp", "wb").write(b"partial")
    print("ready", flush=True)
    time.sleep(600)
    """
)


def registrations(directory: Path) -> list[tuple[str, int]]:
    """Streaming shared-memory registrations naming ``directory``'s streams: (name, inode).

    The inode tells a dead run's segment from a new one that reuses its name.
    """
    out = []
    for name in os.listdir(SHM_DIR):
        if name.endswith("_locals"):
            path = os.path.join(SHM_DIR, name)
            try:
                if any(d.startswith(str(directory)) for d in _registered_locals(path)):
                    out.append((name, os.stat(path).st_ino))
            except (OSError, ValueError, IndexError):
                pass
    return out


@pytest.fixture
def prep(tmp_path):
    root = write_prep_output(tmp_path / "mix", {"a": 40, "b": 20}, seq_len=SEQ, shard_bytes=1024)
    return read_prep_output(str(root), field="data.root", seq_len=SEQ)


@pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs Linux /dev/shm to inspect shared memory")
def test_next_run_recovers_from_a_killed_run(prep, tmp_path):
    from streaming import Stream, StreamingDataset

    starting, reading = tmp_path / "starting", tmp_path / "reading"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, prep.root, str(starting), str(reading)], cwd=REPO, stdout=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes its resource tracker too
    )
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline().strip() == b"ready"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    stale = {cache: registrations(cache) for cache in (starting, reading)}
    assert all(stale.values()), "the killed run should have left its shared memory behind"

    # Streaming on its own refuses the directories a run killed at start-up registered.
    streams = [Stream(remote=prep.streams[n].url, local=str(starting / n)) for n in ("a", "b")]
    with pytest.raises(ValueError, match="Reused local directory"):
        StreamingDataset(streams=streams, batch_size=1)

    for cache in (starting, reading):
        store = ShardStore(prep, ["a", "b"], str(cache))
        try:
            tokens, _ = store.read(np.array([0, 0, 1, 1]), np.array([3, 39, 0, 19]))
            for row, (s, i) in enumerate([(0, 3), (0, 39), (1, 0), (1, 19)]):
                assert tokens[row].tolist() == sample_tokens(s, i, SEQ).tolist()
            assert len(registrations(cache)) == 1 and not set(registrations(cache)) & set(stale[cache])
        finally:
            store.close()
        assert registrations(cache) == []  # close() leaves nothing for the next run either
    assert not (reading / "a" / "shard.00003.mds.zstd.3f9a1c2b").exists()
    assert not (reading / "b" / "shard.00001.mds.tmp").exists()


def test_a_live_owner_of_the_cache_is_an_error(prep, tmp_path):
    first = ShardStore(prep, ["a"], str(tmp_path / "cache"))
    try:
        with pytest.raises(ConfigError) as err:
            ShardStore(prep, ["a"], str(tmp_path / "cache"))
        assert err.value.field == "data.local_cache"
        assert f"in use by an earlier loader of this process (pid {os.getpid()}) that was not closed" in str(err.value)
    finally:
        first.close()
    second = ShardStore(prep, ["a"], str(tmp_path / "cache"))  # released on close
    second.close()
