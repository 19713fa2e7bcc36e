"""``titan-moe demo``: the whole pipeline on a laptop CPU, offline, in a few minutes.

    titan-moe demo [--out outputs/demo] [--steps 150] [--nproc 2]
    python3 run.py demo                       # the same, in the locked environment

Stages (each is the real command's code path, and each is resumable, so a
re-run skips what is finished):

1. a synthetic corpus in the OLMoE-mix layout (``jobs/synthetic_corpus.py``),
   with malformed lines planted in every source, and a small BPE tokenizer;
2. ``titan-moe prep`` into a local directory that stands in for the object
   store; the manifest shows the planted lines counted and rejected;
3. ``titan-moe sweep plan jobs/specs/mini.yaml`` with ``[data]`` pointed at
   the prep output and ``[arch].vocab_size`` at the tokenizer: a dense
   baseline and three FLOP-matched MoE points (granularity 1, 1/2, 1/4 at
   sparsity 4), ``--steps`` optimizer steps each;
4. ``titan-moe sweep launch --local``: every point trains with 2 processes
   (FSDP2 + expert parallelism 2), then ``titan-moe eval`` scores its final
   checkpoint on held-out synthetic documents filed in Paloma's text layout
   (synthetic text, not Paloma: see ``synthetic_corpus.write_heldout_paloma``);
5. ``titan-moe sweep collect`` and ``plot``; the results table, the figures
   and the TensorBoard logdir are printed at the end, with what the numbers
   mean against the paper (``jobs/demo_reading.py``: at the demo's compute the
   paper expects dense to beat the MoE points).

The sweep directory is named after the step count (``sweep-150steps``), so a
run with another ``--steps`` plans afresh and reuses the corpus and prep output.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from jobs import synthetic_corpus as corpus
from jobs.demo_progress import TrainingProgress, show_log_tail
from jobs.demo_reading import read_against_paper
from titan_moe.common.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MINI_SPEC = REPO / "jobs" / "specs" / "mini.yaml"
DEFAULT_OUT = Path("outputs") / "demo"
DEFAULT_STEPS = 150
DEFAULT_NPROC = 2
HELDOUT_DOCS = 50  # per synthetic source
CORPUS_MARKER = ".complete"


@dataclass
class DemoPaths:
    """Where each stage writes, under ``--out``."""

    root: Path
    steps: int

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"  # data/<source>/*.json.{gz,zst}

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer" / "tokenizer.json"

    @property
    def store(self) -> Path:
        """The prep output: the stand-in for s3://BUCKET/olmoe-mix/seq64."""
        return self.root / "object_store" / "olmoe-mix-synthetic" / "seq64"

    @property
    def heldout(self) -> Path:
        return self.root / "eval_data" / "paloma_layout_synthetic"

    @property
    def sweep(self) -> Path:
        return self.root / f"sweep-{self.steps}steps"


def _stage(number: int, title: str) -> float:
    print(f"\n=== [{number}/5] {title}")
    return time.monotonic()


def _done(start: float) -> None:
    print(f"    ({time.monotonic() - start:.1f} s)")


# --------------------------------------------------------------------------- 1. corpus
def make_corpus(paths: DemoPaths) -> int:
    """Write the corpus and train the tokenizer unless a previous run did; returns the vocab size."""
    from tokenizers import Tokenizer

    if not (paths.corpus / CORPUS_MARKER).exists():
        corpus.write_corpus(paths.corpus)
        (paths.corpus / CORPUS_MARKER).write_text("written by titan-moe demo\n")
        print(f"    wrote {paths.corpus}/data/<source>/ (OLMoE-mix layout)")
    else:
        print(f"    corpus already in {paths.corpus}")
    for source, (_, weight) in corpus.SOURCES.items():
        files = sorted(p.name for p in (paths.corpus / "data" / source).iterdir())
        print(f"      {source:<10} {', '.join(files)}  (relative size {weight})")
    planted = ", ".join(f"{n} {reason}" for reason, n in corpus.PLANTED_REJECTS.items())
    print(f"    planted in every source on purpose: {planted} line(s); prep must reject them")
    if not paths.tokenizer.exists():
        corpus.train_tokenizer(paths.corpus, paths.tokenizer)
    tokenizer = Tokenizer.from_file(str(paths.tokenizer))
    vocab = tokenizer.get_vocab_size()
    print(f"    BPE tokenizer {paths.tokenizer}: {vocab} ids, EOS <|endoftext|> = "
          f"{tokenizer.token_to_id('<|endoftext|>')}, PAD <|padding|> = {tokenizer.token_to_id('<|padding|>')}")
    return vocab


# --------------------------------------------------------------------------- 2. prep
def run_prep(paths: DemoPaths, seq_len: int) -> dict:
    """``titan-moe prep CORPUS STORE --tokenizer ... --seq-len ...``; returns the mixture manifest."""
    from data_prep.cli import build_parser, config_from_args
    from data_prep.pipeline import run_prep as prep

    argv = [str(paths.corpus), str(paths.store), "--tokenizer", str(paths.tokenizer), "--seq-len", str(seq_len),
            "--workers", "2", "--shard-size", "256kb"]
    print(f"    $ titan-moe prep {' '.join(argv)}")
    report = prep(config_from_args(build_parser().parse_args(argv)))
    if report.sources_skipped and not report.sources_written:
        print(f"    already prepped: {', '.join(report.sources_skipped)} (resumed; nothing to do)")
    manifest = json.loads((paths.store / "manifest.json").read_text())
    print(f"    manifest {paths.store / 'manifest.json'}: seq_len {manifest['seq_len']}, eos_id {manifest['eos_id']}, "
          f"pad_id {manifest['pad_id']}, {manifest['dtype']}")
    print(f"      {'source':<10} {'docs read':>9} {'written':>8} {'rejected':>8}  {'sequences':>9} {'tokens':>8} "
          f"{'share':>6}  rejected by reason")
    for name, s in manifest["sources"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items())) or "-"
        print(f"      {name:<10} {s['docs_read']:>9,} {s['docs_written']:>8,} {s['docs_rejected']:>8,}  "
              f"{s['sequences']:>9,} {s['tokens']:>8,} {s['proportion']:>6.1%}  {reasons}")
    rejected = sum(s["docs_rejected"] for s in manifest["sources"].values())
    planted = sum(corpus.PLANTED_REJECTS.values()) * len(manifest["sources"])
    verdict = "all of them" if rejected == planted else "MISMATCH"
    print(f"    rejected {rejected} malformed lines of the {planted} planted ({verdict}); everything else was written")
    return manifest


# --------------------------------------------------------------------------- 3. plan
def sweep_overrides(paths: DemoPaths, vocab_size: int, steps: int) -> list[str]:
    """``--set`` values that turn mini.yaml into the demo sweep.

    The shape keeps mini.yaml's scale with the demo tokenizer's vocabulary;
    the budget ratio is the one that gives ``steps`` optimizer steps (the
    planner rounds tokens up to whole steps, hence the half step).
    """
    from jobs.sweep.spec_file import load_spec
    from titan_moe.model.accounting import describe
    from titan_moe.model.args import TitanMoEModelArgs

    scales = yaml.safe_load(MINI_SPEC.read_text())["scales"]
    for scale in scales:
        scale["arch"]["vocab_size"] = vocab_size
    data = [
        f"scales={json.dumps(scales)}",
        "run.training.dataset=mds",
        f"run.data.root={paths.store.resolve()}",
    ]
    spec = load_spec(MINI_SPEC, data)
    dense = describe(TitanMoEModelArgs.from_sections(spec.scales[0].arch, None, spec.seq_len), spec.seq_len)
    ratio = (steps - 0.5) * spec.global_batch_size * spec.seq_len / dense["non_embedding_active_params"]
    return [*data, f"budget.tokens_per_param={ratio!r}"]


def plan_sweep(paths: DemoPaths, vocab_size: int, steps: int) -> list[dict]:
    from jobs.sweep.cli import main as sweep_main
    from jobs.sweep.plan import load_index

    overrides = sweep_overrides(paths, vocab_size, steps)
    argv = ["plan", str(MINI_SPEC), "--out", str(paths.sweep)] + [a for o in overrides for a in ("--set", o)]
    shown = [str(MINI_SPEC.relative_to(REPO)) if a == str(MINI_SPEC) and Path.cwd() == REPO else a for a in argv]
    print("    $ titan-moe sweep " + " ".join(_quote(a) for a in shown))
    if sweep_main(argv) != 0:
        raise ConfigError("--out", f"could not plan into {paths.sweep}; remove it or pick another --out")
    points = load_index(paths.sweep)["points"]
    wrong = [p["name"] for p in points if p["steps"] != steps]
    if wrong:  # the budget arithmetic above is the demo's, so check it
        raise ConfigError("--steps", f"planned {points[0]['steps']} steps instead of {steps} for {', '.join(wrong)}")
    print(f"    {'point':<16} {'experts':>7} {'top-k':>5} {'expert width':>12} {'total params':>12} "
          f"{'active params':>13} {'FLOPs/token':>11} {'steps':>5}")
    for p in points:
        width = "-" if p["kind"] == "dense" else f"{p['granularity']} x ffn"
        print(f"    {p['name']:<16} {p['num_experts'] or '-':>7} {p['top_k'] or '-':>5} {width:>12} "
              f"{p['total_params']:>12,} {p['active_params']:>13,} {p['flops_per_token']:>11,} {p['steps']:>5}")
    return points


def _quote(arg: str) -> str:
    return f"'{arg}'" if re.search(r"[\s\[\]{}\"*]", arg) else arg


# --------------------------------------------------------------------------- 4. launch
def heldout_tasks() -> str:
    return "paloma:" + "+".join(corpus.PALOMA_STANDINS.values())


def launch(paths: DemoPaths, points: list[dict], nproc: int) -> bool:
    from jobs.sweep.launch import launch_local

    eval_args = [f"--data-root={paths.heldout.resolve()}", "--no-progress"]
    shown = " ".join(["titan-moe sweep launch", str(paths.sweep), "--local", "--nproc", str(nproc),
                      "--eval-tasks", heldout_tasks(), *(f"--eval-arg={a}" for a in eval_args)])
    print(f"    $ {shown}")
    print(f"    each point: torchrun, {nproc} CPU processes (gloo), FSDP2 over {nproc} ranks, expert parallel "
          "degree 2 for the MoE points; log in POINT/train.log")
    progress = TrainingProgress(paths.sweep, points)
    progress.start()
    try:
        report = launch_local(paths.sweep, nproc, eval_tasks=heldout_tasks(), eval_args=eval_args)
    finally:
        progress.stop()
    print(f"    trained {len(report.ran)}, skipped {len(report.skipped)} finished earlier, "
          f"failed {len(report.failed)}; evaluated {len(report.evaluated)}, eval failed {len(report.eval_failed)}")
    for name in report.failed:
        show_log_tail(paths.sweep / "points" / name / "train.log")
    for name in report.eval_failed:
        show_log_tail(paths.sweep / "points" / name / "eval.log")
    return report.ok


# --------------------------------------------------------------------------- 5. collect + plot
def training_curves(sweep_dir: Path, names: list[str], out: Path) -> Path | None:
    """LM loss vs step for every point, from the TensorBoard events collect reads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.sweep.collect import LM_LOSS_TAGS, read_scalars

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    drawn = 0
    for name in names:
        scalars = read_scalars(sweep_dir / "points" / name)
        tag = next((t for t in LM_LOSS_TAGS if scalars.get(t)), None)
        if tag is None:
            continue
        steps = sorted(scalars[tag])
        values = [scalars[tag][s] for s in steps]
        window = max(1, len(values) // 15)  # a running mean: the mixture makes single batches noisy
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, smooth, label=name, linestyle="--" if "dense" in name else "-")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(f"LM loss (train, running mean of {window})")
    ax.set_title("demo sweep: training curves")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def heldout_table(sweep_dir: Path, rows: list[dict]) -> str:
    """Per-subset held-out CE of every point (from POINT/eval.json), as Markdown."""
    subsets = list(corpus.PALOMA_STANDINS.items())
    head = "| point | train loss | " + " | ".join(f"{src} ({s})" for src, s in subsets) + " | macro CE |"
    lines = [head, "|---|" + "---:|" * (len(subsets) + 2)]
    for row in rows:
        path = sweep_dir / "points" / row["name"] / "eval.json"
        paloma = json.loads(path.read_text())["tasks"]["paloma"] if path.exists() else {}
        ce = [paloma.get("subsets", {}).get(s, {}).get("ce") for _, s in subsets]
        cells = [_fmt(row.get("train_loss")), *map(_fmt, ce), _fmt(paloma.get("macro_ce"))]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def collect_and_plot(paths: DemoPaths, points: list[dict]) -> tuple[list[dict], list[Path]]:
    from jobs.sweep.cli import main as sweep_main
    from jobs.sweep.collect import write_results

    print(f"    $ titan-moe sweep collect {paths.sweep}")
    _, _, rows = write_results(paths.sweep)
    figures: list[Path] = []
    plots = paths.sweep / "plots"
    # The demo trains without a validation set, so its LM figures are the training loss, named: left
    # to ``auto``, plot would pick paloma_macro_ce (eval results exist), but the demo's held-out set is
    # synthetic text the eval files under "paloma".  Its held-out CE (what demo_reading compares first)
    # gets its own folder, named for what it is.
    heldout_plots = plots / "synthetic_heldout_ce"
    for argv in (["plot", str(paths.sweep), "--metric", "train_loss"],
                 ["plot", str(paths.sweep), "--metric", "paloma_macro_ce", "--out", str(heldout_plots)]):
        print(f"    $ titan-moe sweep {' '.join(argv)}")
        if sweep_main(argv) != 0:
            raise ConfigError("plot", f"titan-moe sweep {' '.join(argv)} failed")
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else plots
        figures += sorted(out.glob("*.png"))
    curves = training_curves(paths.sweep, [p["name"] for p in points], plots / "training_curves.png")
    if curves:
        figures.append(curves)
    return rows, figures


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="titan-moe demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"optimizer steps per sweep point (default {DEFAULT_STEPS}; ~5 s per 10 steps for 4 points)")
    p.add_argument("--nproc", type=int, default=DEFAULT_NPROC,
                   help=f"processes per point (default {DEFAULT_NPROC}; a multiple of 2, the expert-parallel degree)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.steps < 1:
            raise ConfigError("--steps", f"must be >= 1, got {args.steps}")
        if args.nproc < 2 or args.nproc % 2:
            raise ConfigError("--nproc", f"must be a multiple of the expert-parallel degree 2, got {args.nproc}")
        # Our lines and the progress bars (stderr) interleave in order only if stdout is line-buffered.
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)
        return run(DemoPaths(args.out, args.steps), args.nproc)
    except ConfigError as exc:
        print(f"titan-moe demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ntitan-moe demo: interrupted; finished work is kept, re-run the same command to resume",
              file=sys.stderr)
        return 130


def run(paths: DemoPaths, nproc: int) -> int:
    began = time.monotonic()
    paths.root.mkdir(parents=True, exist_ok=True)
    print(f"titan-moe demo: synthetic data -> prep -> MoE-vs-dense sweep -> eval -> plots, in {paths.root}")

    t = _stage(1, "synthetic OLMoE-mix corpus and tokenizer")
    vocab = make_corpus(paths)
    _done(t)

    t = _stage(2, "titan-moe prep: corpus -> MDS streams in the (local) object store")
    seq_len = yaml.safe_load(MINI_SPEC.read_text())["run"]["training"]["seq_len"]
    run_prep(paths, seq_len)
    counts = corpus.write_heldout_paloma(paths.heldout, HELDOUT_DOCS)
    print(f"    held-out eval data: {sum(counts.values())} fresh SYNTHETIC documents in Paloma's text layout under "
          f"{paths.heldout}")
    print("      NOT Paloma: filed under Paloma subset names so that `titan-moe eval` reads them ("
          + ", ".join(f"{s} = synthetic {src}" for src, s in corpus.PALOMA_STANDINS.items()) + ")")
    _done(t)

    t = _stage(3, f"titan-moe sweep plan: dense baseline + FLOP-matched MoE points, {paths.steps} steps each")
    points = plan_sweep(paths, vocab, paths.steps)
    _done(t)

    t = _stage(4, "titan-moe sweep launch --local: train every point, then eval its final checkpoint")
    ok = launch(paths, points, nproc)
    _done(t)
    if not ok:
        print("\ntitan-moe demo: some points failed (logs above); re-run the same command to retry them",
              file=sys.stderr)
        return 1

    t = _stage(5, "titan-moe sweep collect + plot")
    rows, figures = collect_and_plot(paths, points)
    _done(t)

    print("\n" + (paths.sweep / "results.md").read_text().rstrip())
    print("\n## held-out cross-entropy (nats/token) by source -- SYNTHETIC held-out documents, not Paloma\n")
    print(heldout_table(paths.sweep, rows))
    print("\n## what these numbers mean, against the paper\n")
    print(read_against_paper(rows))
    print(f"\nresults:      {paths.sweep / 'results.md'}  (all columns: {paths.sweep / 'results.csv'})")
    print("figures:")
    for fig in figures:
        print(f"  {fig}")
    print(f"TensorBoard:  tensorboard --logdir {paths.sweep / 'points'}")
    print(f"\ndemo finished in {time.monotonic() - began:.0f} s; re-running skips everything already done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
