"""``titan-moe sweep plan|launch|collect|plot``.

    titan-moe sweep plan SPEC.yaml --out DIR [--set key.path=value ...] [--max-tier N] [--mfu F] [--peak-tflops P] [--force]
    titan-moe sweep cost SPEC.yaml [SPEC.yaml ...] [--set ...] [--max-tier N] [--mfu F] [--peak-tflops P]
    titan-moe sweep launch DIR --local [--nproc N] [--only GLOB] [--eval-tasks T [--eval-arg ARG ...]] [--dry-run]
    titan-moe sweep launch DIR --k8s --image IMAGE [--nodes N] [--gpus-per-node G] [--queue Q] [--only GLOB]
    titan-moe sweep collect DIR
    titan-moe sweep plot DIR [--metric auto|METRIC | --all-metrics] [--only GLOB ...] [--out PLOTS]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_moe.common.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="titan-moe sweep", description="Plan, launch, collect and plot design-space sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="write one run config per design point plus index.{csv,json}")
    p.add_argument("spec", help="sweep spec YAML (see jobs/specs/)")
    p.add_argument("--out", required=True, help="plan directory (points/<name>/config.toml, index.*)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec value, e.g. --set cluster.ep_degree=4 --set run.data.root=/data/mds")
    p.add_argument("--force", action="store_true", help="replace configs of points that already finished")
    p.add_argument("--quiet", action="store_true", help="do not list the invalid points")
    p.add_argument("--max-tier", type=int, help="plan only the points of tiers <= N (1: the headline figures' runs)")
    _cost_flags(p)

    cp = sub.add_parser("cost", help="GPU-hours per study and scale, without writing anything")
    cp.add_argument("specs", nargs="+", help="sweep spec YAML files (e.g. jobs/specs/*.yaml)")
    cp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a value of every spec")
    cp.add_argument("--max-tier", type=int, help="count only the points of tiers <= N")
    cp.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation, the same for every study (default 0.35)")
    cp.add_argument("--peak-tflops", type=float, default=989.0,
                    help="peak TFLOP/s per GPU (default 989 = H100/H200 dense bf16)")

    lp = sub.add_parser("launch", help="run the points locally (resumable) or render Kubernetes manifests")
    lp.add_argument("dir", help="a directory written by `titan-moe sweep plan`")
    where = lp.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="train the points one after another on this machine")
    where.add_argument("--k8s", action="store_true", help="render one manifest set per point into POINT/k8s")
    lp.add_argument("--only", action="append", default=[], metavar="GLOB", help="only points whose name matches")
    lp.add_argument("--nproc", type=int, help="--local: processes per point (default: the spec's cluster.local_nproc)")
    lp.add_argument("--eval-tasks", help="--local: score finished points, e.g. paloma,boolq (titan-moe eval --tasks)")
    lp.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                    help="--local: extra argument for titan-moe eval (repeat; e.g. --eval-arg=--data-root=/data/eval)")
    lp.add_argument("--dry-run", action="store_true", help="--local: print the commands only")
    lp.add_argument("--stop-on-failure", action="store_true", help="--local: stop at the first failed point")
    lp.add_argument("--image", help="--k8s: training image")
    lp.add_argument("--nodes", type=int, help="--k8s: node pods per run (default: the spec's cluster.nodes)")
    lp.add_argument("--gpus-per-node", type=int, help="--k8s: GPUs per node (default: the spec's cluster.gpus_per_node)")
    lp.add_argument("--queue", help="--k8s: Kueue LocalQueue name")
    lp.add_argument("--namespace", help="--k8s: namespace of every object")
    lp.add_argument("--pvc", dest="runs_claim", help="--k8s: ReadWriteMany claim for checkpoints + TensorBoard")

    c = sub.add_parser("collect", help="gather losses, eval results and MoE health into results.{csv,md}")
    c.add_argument("dir")

    pl = sub.add_parser("plot", help="draw the paper's figures from results.csv (PNG + SVG + JSON series)")
    pl.add_argument("dir")
    pl.add_argument("--results", help="results CSV (default DIR/results.csv)")
    pl.add_argument("--out", help="figure directory (default DIR/plots)")
    pl.add_argument("--metric", default="auto", help="any metric column of results.csv, e.g. paloma_c4_en_ce, "
                    "hellaswag_rc_5shot_len_norm_v1; auto: paloma_macro_ce if present, else val_loss, else train_loss")
    pl.add_argument("--all-metrics", action="store_true", help="one figure set per LM loss and eval metric, in OUT/<metric>/")
    pl.add_argument("--only", action="append", default=[], metavar="GLOB", help="only figures whose name matches (repeat)")
    return parser


def _cost_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation for the GPU-hour estimate "
                   "(default: the spec's cluster.mfu, 0.35 in the paper's specs)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU (default: the spec's cluster.peak_tflops, "
                   "989 = H100/H200 dense bf16)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set values, then --mfu/--peak-tflops as the cluster overrides they are."""
    extra = [f"cluster.mfu={args.mfu!r}"] if args.mfu is not None else []
    extra += [f"cluster.peak_tflops={args.peak_tflops!r}"] if args.peak_tflops is not None else []
    return [*args.overrides, *extra]


def _plan(args: argparse.Namespace) -> int:
    from jobs.sweep.cost import COST_COLUMNS, TIER_COLUMNS, cost_rows, format_table, format_tiers, tier_rows
    from jobs.sweep.plan import FLOPS_TOLERANCE, above_tolerance, atomic_write, csv_text, summary, write_plan
    from jobs.sweep.spec_file import load_spec
    from jobs.sweep.study import build

    spec = load_spec(args.spec, _overrides(args))
    plan = build(spec, args.out, max_tier=args.max_tier, progress=sys.stderr.isatty())
    if not plan.points:
        raise ConfigError("--max-tier", f"no point of '{spec.name}' is in tiers <= {args.max_tier}; nothing planned")
    out = write_plan(plan, args.out, force=args.force)
    s = summary(plan)
    costs, tiers = cost_rows(plan), tier_rows(plan)
    atomic_write(out / "cost.csv", csv_text(costs, COST_COLUMNS))
    atomic_write(out / "cost_tiers.csv", csv_text(tiers, TIER_COLUMNS))
    cut = f" (tiers <= {args.max_tier})" if args.max_tier is not None else ""
    print(f"planned {s['points']} points ({s['dense']} dense, {s['moe']} MoE) of sweep '{spec.name}'{cut} into {out}")
    print(f"  total training compute {s['train_flops']:.3e} FLOPs = {s['gpu_hours']:,.4g} GPU-hours "
          f"at MFU {spec.cluster.mfu:g} of {spec.cluster.peak_tflops:g} TFLOP/s (true FLOPs, routers included)")
    over = above_tolerance(plan)
    if over:
        worst = max(over, key=lambda r: r["flops_ratio_vs_dense"])
        print(f"  {len(over)} points cost more than {FLOPS_TOLERANCE:g}x their dense baseline's FLOPs per token "
              f"(the routers, which the matching rule leaves out); worst {worst['name']} at "
              f"{worst['flops_ratio_vs_dense']:.3f}x (column flops_ratio_vs_dense)")
    print(format_table(costs, spec.cluster.mfu, spec.cluster.peak_tflops))
    if len(tiers) > 1 or tiers[0]["tier"] != 1:
        print(format_tiers(tiers))
    if plan.invalid:
        print(f"  skipped {s['invalid_points']} invalid points ({s['invalid_designs']} designs); see {out / 'invalid.csv'}")
        if not args.quiet:
            for row in plan.invalid:
                print(f"    {row['name']}: {row['reason']}")
    return 0


def _cost(args: argparse.Namespace) -> int:
    import tempfile

    from jobs.sweep.cost import cost_rows, format_table, format_tiers, tier_rows
    from jobs.sweep.spec_file import load_spec
    from jobs.sweep.study import build

    import yaml

    rows, tiers = [], []
    with tempfile.TemporaryDirectory() as scratch:  # build only names paths under it
        for path in args.specs:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else None
            if isinstance(doc, dict) and "name" not in doc:  # a base (paper_base, ladder) is never a study
                print(f"note: skipped {path}: a shared base for `extends` (no name), not a study")
                continue
            plan = build(load_spec(path, _overrides(args)), scratch, max_tier=args.max_tier,
                         progress=sys.stderr.isatty())
            rows += cost_rows(plan)
            tiers += tier_rows(plan)
    print(format_table(rows, args.mfu, args.peak_tflops))
    if any(r["tier"] != 1 for r in tiers):
        print(format_tiers(tiers))
    return 0


def _launch(args: argparse.Namespace) -> int:
    from jobs.sweep import launch
    from jobs.sweep.plan import load_index

    plan_dir = Path(args.dir)
    if args.local:
        report = launch.launch_local(plan_dir, args.nproc, only=args.only, eval_tasks=args.eval_tasks,
                                     eval_args=args.eval_arg, dry_run=args.dry_run, stop_on_failure=args.stop_on_failure)
        if not args.dry_run:
            print(f"ran {len(report.ran)}, skipped {len(report.skipped)} finished, failed {len(report.failed)}"
                  + (f"; evaluated {len(report.evaluated)}, eval failed {len(report.eval_failed)}" if args.eval_tasks else ""))
            for name in report.failed:
                print(f"  failed: {name} (log: {plan_dir / 'points' / name / 'train.log'})")
        return 0 if report.ok else 1
    cluster = load_index(plan_dir)["cluster"]
    options = {k: v for k, v in (("namespace", args.namespace), ("runs_claim", args.runs_claim)) if v}
    report = launch.launch_k8s(plan_dir, nodes=args.nodes or cluster["nodes"],
                               gpus_per_node=args.gpus_per_node or cluster["gpus_per_node"], image=args.image,
                               queue=args.queue, only=args.only, options=options)
    print(f"rendered {len(report.rendered)} points, {len(report.failed)} could not be rendered")
    if report.rendered:
        print(f"  apply one:  kubectl apply -k {plan_dir}/points/{report.rendered[0]}/k8s")
        print(f"  apply all:  for d in {plan_dir}/points/*/k8s; do kubectl apply -k $d; done")
    return 0 if report.ok else 1


def _collect(args: argparse.Namespace) -> int:
    from jobs.sweep.collect import write_results

    csv_path, md_path, rows = write_results(args.dir)
    with_loss = sum(r.get("train_loss") is not None for r in rows)
    with_eval = sum(r.get("paloma_macro_ce") is not None for r in rows)
    print(f"collected {len(rows)} points ({with_loss} with a training loss, {with_eval} with Paloma): {csv_path}, {md_path}")
    from jobs.sweep.versions import mixed_versions

    mixed = mixed_versions(rows)
    if mixed:  # a warning, not a failure: the table is still right, only not comparable across versions
        print(f"warning: {mixed}", file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from jobs.sweep.plot import plot

    written, notes = plot(args.dir, args.results, args.out, args.metric, all_metrics=args.all_metrics,
                          only=tuple(args.only))
    for note in notes:
        print(f"note: {note}")
    pngs = [p for p in written if p.suffix == ".png"]
    print(f"wrote {len(pngs)} figures (PNG + SVG + JSON series) into {args.out or Path(args.dir) / 'plots'}")
    for p in pngs:
        print(f"  {p.parent.name + '/' if args.all_metrics else ''}{p.stem}")
    return 0 if pngs else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    handler = {"plan": _plan, "cost": _cost, "launch": _launch, "collect": _collect, "plot": _plot}[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"titan-moe sweep {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
