"""``titan-moe sweep launch DIR --local | --k8s``: run or render every planned point.

Local: points run one after another, each as ``titan-moe train POINT/config.toml
--nproc N`` with its output in ``POINT/train.log``.  A point is marked finished
(``POINT/.done``) only after the trainer exits 0, so re-running the launch skips
finished points and restarts the others (the trainer resumes from the newest
checkpoint in its dump folder).  A failure is recorded in ``POINT/.failed``; the
launch goes on with the next point (``--stop-on-failure`` stops instead) and
exits non-zero.  ``--eval-tasks`` then scores each finished point's final
checkpoint with ``titan-moe eval`` into ``POINT/eval.json`` (skipped when it exists).

Kubernetes: one manifest set per point in ``POINT/k8s/`` from the k8s renderer
(``jobs.k8s.render.render_run``), named ``<spec>-<point>``; apply them with
``kubectl apply -k DIR/points/<point>/k8s``.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from jobs.sweep.plan import CONFIG_NAME, DONE_MARKER, atomic_write, load_index
from titan_moe.common.errors import ConfigError

FAILED_MARKER = ".failed"
EVAL_NAME = "eval.json"


@dataclass
class LaunchReport:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    eval_failed: list[str] = field(default_factory=list)
    rendered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.eval_failed)


def select_points(plan_dir: Path, only: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(name, point dir) of the indexed points, in plan order, filtered by glob patterns."""
    index = load_index(plan_dir)
    names = [row["name"] for row in index["points"]]
    if only:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pattern) for pattern in only)]
        if not names:
            raise ConfigError("--only", f"no point of {plan_dir} matches {', '.join(only)}")
    points = []
    for name in names:
        point_dir = plan_dir / "points" / name
        if not (point_dir / CONFIG_NAME).is_file():
            raise ConfigError("DIR", f"{point_dir / CONFIG_NAME} is missing; re-run `titan-moe sweep plan`")
        points.append((name, point_dir))
    return points


def train_command(config: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "titan_moe.cli", "train", str(config), "--nproc", str(nproc)]


def eval_command(point_dir: Path, tasks: str, extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "titan_moe.cli", "eval", "--checkpoint", str(point_dir / "checkpoint"),
            "--config", str(point_dir / CONFIG_NAME), "--tasks", tasks, "--out", str(point_dir / EVAL_NAME),
            *extra]


def _run_logged(cmd: list[str], log_path: Path) -> tuple[int, float]:
    start = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    return rc, time.monotonic() - start


def launch_local(
    plan_dir: str | Path,
    nproc: int | None = None,
    *,
    only: Sequence[str] = (),
    eval_tasks: str | None = None,
    eval_args: Sequence[str] = (),
    dry_run: bool = False,
    stop_on_failure: bool = False,
    make_train_command: Callable[[Path, int], list[str]] = train_command,
    make_eval_command: Callable[[Path, str, Sequence[str]], list[str]] = eval_command,
) -> LaunchReport:
    """Train (and optionally evaluate) the points in plan order; finished points are skipped."""
    plan_dir = Path(plan_dir).resolve()
    if nproc is None:
        nproc = int(load_index(plan_dir)["cluster"].get("local_nproc", 1))
    if nproc < 1:
        raise ConfigError("--nproc", f"must be >= 1, got {nproc}")
    report = LaunchReport()
    points = select_points(plan_dir, only)
    bar = tqdm(points, desc="sweep points", unit="point", disable=dry_run or len(points) < 2)
    for name, point_dir in bar:
        bar.set_postfix_str(name)
        done = (point_dir / DONE_MARKER).exists()
        if done:
            report.skipped.append(name)
        else:
            cmd = make_train_command(point_dir / CONFIG_NAME, nproc)
            if dry_run:
                print(" ".join(cmd))
                continue
            rc, seconds = _run_logged(cmd, point_dir / "train.log")
            if rc != 0:
                report.failed.append(name)
                atomic_write(point_dir / FAILED_MARKER, json.dumps({"returncode": rc, "seconds": seconds}) + "\n")
                tqdm.write(f"FAILED {name} (exit {rc}); see {point_dir / 'train.log'}", file=sys.stderr)
                if stop_on_failure:
                    break
                continue
            (point_dir / FAILED_MARKER).unlink(missing_ok=True)
            atomic_write(point_dir / DONE_MARKER, json.dumps(
                {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1), "command": cmd}
            ) + "\n")
            report.ran.append(name)
            tqdm.write(f"finished {name} in {seconds:.0f} s")
        if eval_tasks and not (point_dir / EVAL_NAME).exists():
            cmd = make_eval_command(point_dir, eval_tasks, eval_args)
            if dry_run:
                print(" ".join(cmd))
                continue
            rc, _ = _run_logged(cmd, point_dir / "eval.log")
            if rc == 0:
                report.evaluated.append(name)
            else:
                report.eval_failed.append(name)
                tqdm.write(f"eval FAILED {name} (exit {rc}); see {point_dir / 'eval.log'}", file=sys.stderr)
                if stop_on_failure:
                    break
    return report


def launch_k8s(
    plan_dir: str | Path,
    *,
    nodes: int,
    gpus_per_node: int,
    image: str | None,
    queue: str | None = None,
    only: Sequence[str] = (),
    options: dict | None = None,
) -> LaunchReport:
    """Render every point's manifests into ``POINT/k8s``; a point the cluster cannot run is reported."""
    from jobs.k8s.options import name_from_stem
    from jobs.k8s.render import render_run

    plan_dir = Path(plan_dir).resolve()
    spec_name = load_index(plan_dir)["spec"]
    report = LaunchReport()
    for name, point_dir in tqdm(select_points(plan_dir, only), desc="rendering", unit="point"):
        try:
            render_run(point_dir / CONFIG_NAME, nodes, gpus_per_node, image, point_dir / "k8s", queue,
                       name=name_from_stem(f"{spec_name}-{name}", nodes), **(options or {}))
        except ConfigError as exc:
            report.failed.append(name)
            tqdm.write(f"cannot render {name}: {exc}", file=sys.stderr)
            continue
        report.rendered.append(name)
    return report
