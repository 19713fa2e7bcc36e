"""Progress for ``titan-moe demo`` while ``sweep launch`` trains a point.

``sweep launch --local`` sends each trainer's output to ``POINT/train.log``
(so a sweep's terminal stays readable); the demo shows the running point's
step and loss by reading the tail of that log.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+|nan|inf)")


def last_logged_step(log: Path) -> tuple[int, float] | None:
    """(step, loss) of the last torchtitan metrics line in a train.log, reading only its tail."""
    try:
        with open(log, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 16384))
            tail = ANSI.sub("", f.read().decode("utf-8", "replace"))
    except OSError:
        return None
    found = STEP_LINE.findall(tail)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


class TrainingProgress(threading.Thread):
    """Shows the running point's step and loss while ``sweep launch`` sends its output to train.log.

    The point being trained is the unfinished one whose log was written last
    since the launch began.  On a terminal this is a progress bar under the
    launch's own; elsewhere (CI logs) a line every ``every_s`` seconds.
    """

    def __init__(self, sweep_dir: Path, points: list[dict], every_s: float = 15.0):
        super().__init__(daemon=True)
        self.points = {p["name"]: p["steps"] for p in points}
        self.sweep_dir, self.every_s = sweep_dir, every_s
        self.started = time.time()
        self.stopped = threading.Event()
        self.interactive = sys.stderr.isatty()

    def active(self) -> str | None:
        best, newest = None, self.started - 1
        for name in self.points:
            point = self.sweep_dir / "points" / name
            log = point / "train.log"
            if (point / ".done").exists() or not log.exists():
                continue
            mtime = log.stat().st_mtime
            if mtime >= newest:
                best, newest = name, mtime
        return best

    def run(self) -> None:
        bar, current, last_print = None, None, 0.0
        while not self.stopped.wait(0.5):
            name = self.active()
            if name != current:
                if bar is not None:
                    bar.close()
                    bar = None
                current = name
                if name is not None and self.interactive:
                    # No rate/ETA: the first ~20 s are torchrun and imports, which would skew both.
                    bar = tqdm(total=self.points[name], desc=f"  training {name}", unit="step", position=1,
                               leave=False, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} step "
                                                       "[{elapsed}{postfix}]")
            if name is None:
                continue
            seen = last_logged_step(self.sweep_dir / "points" / name / "train.log")
            if bar is not None:
                if seen:
                    bar.n = min(seen[0], bar.total)
                bar.set_postfix_str(f"loss {seen[1]:.3f}" if seen else "starting torchrun", refresh=False)
                bar.refresh()
            elif time.monotonic() - last_print >= self.every_s:
                last_print = time.monotonic()
                state = f"step {seen[0]}/{self.points[name]}, loss {seen[1]:.3f}" if seen else "starting"
                print(f"    {name}: {state}")
        if bar is not None:
            bar.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def show_log_tail(log: Path, lines: int = 25) -> None:
    print(f"\n    --- last {lines} lines of {log} ---")
    try:
        text = ANSI.sub("", log.read_text(errors="replace")).splitlines()[-lines:]
    except OSError as exc:
        text = [f"(cannot read: {exc})"]
    for line in text:
        print(f"    | {line}")
