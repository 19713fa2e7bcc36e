"""The run's progress budget: attempts in a row that ended without a new committed checkpoint.

``maxRestarts`` counts restarts; a long run on spot nodes restarts many times
and each of those restarts is harmless as long as the run moves forward.  What
must stop a run is a crash loop: the same failure at the same place, attempt
after attempt.  So the entrypoint of every pod, before it starts torchrun,
looks at the newest *committed* checkpoint (the step a resume would load) and
at ``<run>/attempts.json`` on the shared volume::

    {"step": 1200, "attempts": ["3", "4"]}

the JobSet restart attempts (``exitcodes.ATTEMPT_ENV``) that have started at
that step.  A new committed step starts a new list (the run made progress: the
failures before it cost nothing); the same step adds this attempt to the list.
When ``limit`` attempts before this one started at the same step and none of
them committed anything, the run is in a crash loop and the entrypoint exits
``CRASH_LOOP`` instead of training.

All pods of one attempt read and write the same list: adding the attempt is
idempotent, so they agree whatever order they start in, and pods of two
attempts never run at once (``BlockingRecreate``).  An attempt that ends in a
preemption is taken off the list again (``forgive``): a SIGTERM is not the
run's fault, even one that lands before the first step.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.k8s.exitcodes import ATTEMPT_ENV, CHECKPOINT_DIR_ENV, CRASH_LOOP_LIMIT_ENV, RUN_DIR_ENV

RECORD = "attempts.json"


def committed_step(checkpoint_dir: str) -> int:
    """The step a resume would load from ``checkpoint_dir``, 0 if none (the trainer's own catalog)."""
    from titan_moe.checkpoint import catalog  # torch-free: a folder listing and the COMMITTED markers

    if not Path(checkpoint_dir).is_dir():
        return 0
    return max((c.step for c in catalog.list_checkpoints(checkpoint_dir) if c.loadable), default=0)


@dataclass(frozen=True)
class Budget:
    run_dir: Path
    checkpoint_dir: str
    limit: int
    attempt: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Budget | None:
        """The budget the renderer configured, None when the pod was not rendered with one."""
        env = dict(os.environ if env is None else env)
        names = (RUN_DIR_ENV, CHECKPOINT_DIR_ENV, CRASH_LOOP_LIMIT_ENV, ATTEMPT_ENV)
        if not all(env.get(n) for n in names):
            return None
        return cls(Path(env[RUN_DIR_ENV]), env[CHECKPOINT_DIR_ENV], int(env[CRASH_LOOP_LIMIT_ENV]), env[ATTEMPT_ENV])

    @property
    def record(self) -> Path:
        return self.run_dir / RECORD

    def _read(self) -> dict:
        try:
            data = json.loads(self.record.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # A damaged record must not turn into an unexplained failure of every pod:
            # start counting afresh (the worst case is one more attempt before a crash loop ends).
            print(f"[entrypoint] warning: ignoring unreadable {self.record}: {exc}", file=sys.stderr, flush=True)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, data: dict) -> None:
        # Unique temp name per process: several pods write the same (idempotent) content.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_name(f".{RECORD}.{os.getpid()}.{os.uname().nodename}")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, self.record)

    def start(self) -> tuple[int, list[str]]:
        """Record this attempt; the committed step it starts from and the earlier attempts without progress."""
        step = committed_step(self.checkpoint_dir)
        data = self._read()
        attempts = [str(a) for a in data.get("attempts", [])] if data.get("step") == step else []
        earlier = [a for a in attempts if a != self.attempt]
        if self.attempt not in attempts:
            self._write({"step": step, "attempts": [*attempts, self.attempt]})
        return step, earlier

    def exhausted(self, earlier: list[str]) -> bool:
        return len(earlier) >= self.limit

    def forgive(self) -> None:
        """This attempt ended in a preemption: it does not count against the budget."""
        data = self._read()
        attempts = [str(a) for a in data.get("attempts", [])]
        if self.attempt in attempts:
            self._write({**data, "attempts": [a for a in attempts if a != self.attempt]})
