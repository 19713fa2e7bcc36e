"""Temporary files left by writers that died: find them and remove them.

Every writer names its temporaries ``<name>.tmp-<pid>[-...]`` (``storage.TMP_MARK``).
A writer killed with SIGKILL cannot clean up, so the next run on the machine
does, deleting only what no living writer still owns.  "Is pid N the writer"
is harder than ``kill(N, 0)``:

* a SIGKILLed worker whose parent died too stays a **zombie** until its new
  parent reaps it, and in a container whose PID 1 never reaps, forever; a
  zombie answers ``kill(N, 0)`` but will never write again;
* pids are **reused**: a process that started after the file was last
  written cannot be the process that wrote it.

On Linux both are read from ``/proc/<pid>/stat``; elsewhere only "the pid
exists" is known, which errs on the side of keeping a file.
"""

from __future__ import annotations

import os
import shutil
import time

from titan_moe.common.storage import TMP_MARK

# A pid counts as reused only when its process started this long after the file's
# last write: /proc start times have clock-tick resolution and mtimes come from
# another clock, so a tolerance keeps a live writer from ever being misjudged.
REUSE_SLACK_S = 1.0


def remove_dead_temp_files(root: str) -> list[str]:
    """Delete ``*.tmp-<pid>`` files and dirs under a local ``root`` whose writer is dead.

    A live writer (another run on this machine) keeps its files.  Returns the
    removed paths.
    """
    removed: list[str] = []
    if not os.path.isdir(root):
        return removed
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames) + filenames:
            if TMP_MARK not in name:
                continue
            pid_text = name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
            path = os.path.join(dirpath, name)
            try:
                last_write = os.stat(path).st_mtime
            except FileNotFoundError:
                continue  # its writer finished (renamed or removed it) meanwhile
            if not pid_text.isdigit() or writer_alive(int(pid_text), last_write):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
                dirnames.remove(name)
            else:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
            removed.append(path)
    return removed


def writer_alive(pid: int, last_write: float) -> bool:
    """Could process ``pid`` still be the writer of a file last modified at ``last_write``?"""
    if pid == os.getpid():
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return _pid_exists(pid)  # no /proc (macOS): existence is all we can tell
    if not stat:
        return False  # no such process
    state, started = stat
    if state in ("Z", "X"):
        return False  # killed, waiting to be reaped: it will never write again
    return started <= last_write + REUSE_SLACK_S


def _proc_stat(pid: int) -> tuple[str, float] | tuple[()] | None:
    """(state, wall-clock start time) of ``pid``; ``()`` if it does not exist; None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return ()
    except OSError:
        return None
    # "pid (comm) state ..." -- comm may hold spaces and parentheses; split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    state, start_ticks = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    since_boot = start_ticks / os.sysconf("SC_CLK_TCK")
    boot_wall = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return state, boot_wall + since_boot


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
