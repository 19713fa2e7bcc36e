"""Log-likelihood of token continuations, batched, sharded over ranks.

Everything the tasks score reduces to one primitive: a `Request` of context
tokens (conditioning only) and continuation tokens (scored), answered with
`sum log p(continuation | context)`.  Multiple-choice answers are requests;
Paloma documents become one request per window (`rolling_windows`).

Batching: requests are sorted by length (longest first, ties by index) and
packed greedily under a token budget, so padding stays small.  The batch
plan depends only on the requests, never on the number of ranks; batch b
runs on rank b % world.  Hence every request is computed in the same batch,
with the same shapes, whatever the world size -> identical numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval import distributed as ed
from eval.models import LogitsModel


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]  # conditioning tokens, left-truncated to fit the model
    continuation: tuple[int, ...]  # tokens whose log-probability is summed


@dataclass
class ScoreStats:
    """What the benchmark reads: real vs padded tokens and time in forward passes."""

    requests: int = 0
    batches: int = 0
    scored_tokens: int = 0  # continuation tokens (the ones that count)
    input_tokens: int = 0  # real (unpadded) tokens fed to the model
    padded_tokens: int = 0  # batch rows x padded length, what the model computed
    forward_s: float = 0.0
    total_s: float = 0.0
    per_rank_batches: list[int] = field(default_factory=list)


class BatchLogits:
    """One batch's logits, at the positions a consumer asks for.

    From a model that exposes its output layer (``final_hidden``, see
    `eval.models`), logits are computed here, only for the asked positions;
    otherwise they are views of the model's full [B, S, V] output.  Positions
    index the flattened batch: row r, position p is ``r * seq + p``.
    """

    def __init__(self, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None):  # fmt: skip
        source = logits if logits is not None else hidden
        self.batch, self.seq = source.shape[:2]
        self.vocab = logits.shape[-1] if logits is not None else weight.shape[0]
        self.device = source.device
        self._flat = source.reshape(self.batch * self.seq, source.shape[-1])
        self._weight = weight

    def at(self, positions: slice | torch.Tensor) -> torch.Tensor:
        """Logits [n, V] of the flat ``positions`` (a slice reads a view of full logits)."""
        rows = self._flat[positions]
        return rows if self._weight is None else F.linear(rows, self._weight)

    def into(self, positions: slice | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Logits of the flat ``positions`` as float32, written into ``out[:n]`` (a reused buffer)."""
        rows = self._flat[positions]
        out = out[: rows.shape[0]]
        if self._weight is not None and rows.dtype == out.dtype:
            return torch.mm(rows, self._weight.t(), out=out)
        # Full logits, or a bfloat16 model: its own precision first, as its forward would, then upcast.
        return out.copy_(rows if self._weight is None else F.linear(rows, self._weight))

    def span(self, row: int, start: int, stop: int) -> torch.Tensor:
        """Logits [1, stop - start, V] of positions start..stop-1 of one row."""
        base = row * self.seq
        return self.at(slice(base + start, base + stop)).unsqueeze(0)


def model_output(model: LogitsModel, tokens: torch.Tensor) -> BatchLogits:
    """Run ``model`` on one batch, through its output-layer split when it has one."""
    split = getattr(model, "final_hidden", None)
    parts = split(tokens) if callable(split) else None
    if parts is None:
        return BatchLogits(logits=model(tokens))
    hidden, weight = parts
    return BatchLogits(hidden=hidden, weight=weight)


def rolling_windows(tokens: list[int], eos_id: int, max_seq_len: int) -> list[Request]:
    """Cut one document into context-sized windows; each token is scored exactly once.

    The first window is conditioned on an EOS prefix: input `[EOS] + t[:L-1]`
    predicts `t[:L]`.  Later windows predict the next L tokens from the L
    tokens before each of them; the final, shorter window still takes a full
    L-token input, its extra (already scored) tokens serving only as context.
    This is lm-evaluation-harness' `get_rolling_token_windows(context_len=1)`
    in disjoint form, which catwalk uses for Paloma.
    """
    if max_seq_len < 1:
        raise ValueError("max_seq_len must be >= 1")
    n = len(tokens)
    if n == 0:
        return []
    first = min(max_seq_len, n)
    windows = [Request((eos_id,), tuple(tokens[:first]))]
    predicted = first
    while predicted < n:
        end = min(n, predicted + max_seq_len)
        windows.append(Request(tuple(tokens[end - max_seq_len - 1 : predicted]), tuple(tokens[predicted:end])))
        predicted = end
    return windows


def model_input(req: Request, max_seq_len: int) -> list[int]:
    """The tokens fed to the model: context + continuation minus the last, left-truncated to L."""
    n = len(req.continuation)
    if n == 0:
        raise ValueError("a request needs at least one continuation token")
    if n > max_seq_len:
        raise ValueError(f"continuation of {n} tokens does not fit the model context of {max_seq_len}")
    if not req.context:
        raise ValueError("a request needs at least one context token (use EOS for an empty context)")
    full = list(req.context) + list(req.continuation)
    return full[-(max_seq_len + 1) : -1]


def plan_batches(lengths: list[int], batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Longest first; fill a batch while rows x longest row stays within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > batch_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def forward_batches(
    model: LogitsModel,
    inputs: list[list[int]],
    consume,
    *,
    batch_tokens: int = 16384,
    max_batch_size: int = 64,
    pad_id: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    group=None,
    stats: ScoreStats | None = None,
) -> list[list[int]]:
    """Run `model` over right-padded batches of `inputs`; `consume(rows, BatchLogits)` per local batch.

    The batch plan depends only on the input lengths; this rank runs batches
    rank, rank + world, ...  All ranks must call this together: every rank
    runs the same number of forwards (idle ranks a 2-token dummy), so an FSDP-
    or expert-parallel-sharded model never waits on a missing peer.  Returns
    the plan (all ranks' batches).
    """
    t_start = time.perf_counter()
    pad = model.eos_id if pad_id is None else pad_id
    batches = plan_batches([len(x) for x in inputs], max(batch_tokens, model.max_seq_len), max_batch_size)
    rank, world = ed.rank(group), ed.world_size(group)
    mine = batches[rank::world]
    steps = math.ceil(len(batches) / world) if batches else 0
    device = getattr(model, "device", None) or "cpu"
    forward_s = 0.0
    bar = tqdm(total=len(mine), desc=desc, unit="batch", disable=not progress or rank != 0, leave=False)
    for step in range(steps):
        if step >= len(mine):
            model(torch.full((1, 2), pad, dtype=torch.long, device=device))  # keep collectives in step
            continue
        rows = mine[step]
        width = len(inputs[rows[0]])
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for r, i in enumerate(rows):
            x[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        t0 = time.perf_counter()
        output = model_output(model, x.to(device))
        if output.device.type == "cuda":
            torch.cuda.synchronize(output.device)
        forward_s += time.perf_counter() - t0
        consume(rows, output)
        if stats is not None:
            stats.padded_tokens += len(rows) * width
            stats.input_tokens += sum(len(inputs[i]) for i in rows)
        bar.update(1)
    bar.close()
    if stats is not None:
        stats.batches += len(batches)
        stats.forward_s += forward_s
        stats.total_s += time.perf_counter() - t_start
        stats.per_rank_batches = [len(batches[r::world]) for r in range(world)]
    return batches


@torch.no_grad()
def score_requests(
    model: LogitsModel,
    requests: list[Request],
    *,
    batch_tokens: int = 16384,
    max_batch_size: int = 64,
    pad_id: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    group=None,
    stats: ScoreStats | None = None,
    logprob_chunk: int = 4096,
) -> list[float]:
    """sum log p(continuation | context) for every request, identical on every rank.

    All ranks must call this together (see `forward_batches`).
    """
    inputs = [model_input(r, model.max_seq_len) for r in requests]
    local: dict[int, float] = {}
    scorer = _ContinuationScorer(logprob_chunk)

    def consume(rows, output: BatchLogits):
        for i, lp in zip(rows, scorer(output, rows, inputs, requests)):
            local[i] = lp

    forward_batches(
        model, inputs, consume, batch_tokens=batch_tokens, max_batch_size=max_batch_size, pad_id=pad_id,
        progress=progress, desc=desc, group=group, stats=stats,
    )  # fmt: skip
    t_gather = time.perf_counter()
    merged: dict[int, float] = {}
    for part in ed.all_gather_objects(local, group):
        merged.update(part)
    if len(merged) != len(requests):
        raise RuntimeError(f"gathered {len(merged)} scores for {len(requests)} requests")
    if stats is not None:
        stats.requests += len(requests)
        stats.scored_tokens += sum(len(r.continuation) for r in requests)
        stats.total_s += time.perf_counter() - t_gather
    return [merged[i] for i in range(len(requests))]


# Scored positions handled at once: on a CPU a block of this many logits (float32: 16 MB)
# stays in cache between the output layer's write and cross-entropy's passes and is reused
# by the allocator, where a whole-batch block (gigabytes at a 50k vocabulary) would be
# fetched from memory again on every pass and page-faulted in fresh for every batch.
# Measured on CPU at a 50k vocabulary and 4,096 positions: the output layer plus
# cross-entropy in 83-row blocks takes 0.27 s; the full logits alone 0.32 s, plus 0.10 s
# for their cross-entropy.  With the block buffer reused (`_ContinuationScorer`), Paloma
# scoring runs at 1.8-2.0x a plain forward pass (benchmarks.eval_throughput, README).
# A GPU wants larger matrix products: 256 MB blocks there.
CE_BLOCK_ELEMENTS = 1 << 22
CE_BLOCK_ELEMENTS_GPU = 1 << 26


def _runs(rows, inputs, requests, S: int) -> list[tuple[int, int]]:
    """(first flat position, length) of the scored positions, adjacent rows' runs merged.

    A Paloma window's scored positions are one run at the end of its row; full
    windows of consecutive rows join into one long run.  Answers are short runs.
    """
    runs: list[tuple[int, int]] = []
    for r, i in enumerate(rows):
        n, m = len(requests[i].continuation), len(inputs[i])
        start = r * S + m - n
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + n)
        else:
            runs.append((start, n))
    return runs


class _ContinuationScorer:
    """Sum over each row's continuation positions of log p(target); float32 math, float64 sums.

    The scored positions are addressed in the flattened batch, in blocks of at
    most `chunk` positions sized to stay in cache (CE_BLOCK_ELEMENTS): long runs
    of consecutive positions (Paloma windows) are read as slices, short
    scattered runs (answers) are gathered together.  Every block's logits land
    in one float32 buffer kept for the whole scoring pass, and the log-softmax
    runs in place there: a fresh multi-megabyte tensor per block would be
    mapped and zero-filled by the kernel each time (most of the scorer's time
    on a CPU, and different in each process depending on the allocator's
    history).
    """

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.scratch: torch.Tensor | None = None

    def _buffer(self, output: BatchLogits) -> torch.Tensor:
        budget = CE_BLOCK_ELEMENTS_GPU if output.device.type == "cuda" else CE_BLOCK_ELEMENTS
        rows = max(1, min(self.chunk, budget // output.vocab))
        s = self.scratch
        if s is None or s.shape != (rows, output.vocab) or s.device != output.device:
            self.scratch = torch.empty(rows, output.vocab, dtype=torch.float32, device=output.device)
        return self.scratch

    def __call__(self, output: BatchLogits, rows, inputs, requests) -> list[float]:
        targets, lengths = [], []
        for i in rows:
            targets += requests[i].continuation
            lengths.append(len(requests[i].continuation))
        device = output.device
        target_t = torch.tensor(targets, device=device)
        scratch = self._buffer(output)
        block = scratch.shape[0]
        pieces: list[torch.Tensor] = []  # -log p per scored position, in target order

        def score(positions: slice | list[int], lo: int) -> int:
            if isinstance(positions, list):
                positions = torch.tensor(positions, device=device)
            logits = output.into(positions, scratch)
            pieces.append(_neg_log_softmax_at_(logits, target_t[lo : lo + logits.shape[0]]))
            return lo + logits.shape[0]

        done, gathered = 0, []  # gathered: flat positions of short runs waiting for one gather
        for start, n in _runs(rows, inputs, requests, output.seq):
            if n < block // 2:
                gathered += range(start, start + n)
                if len(gathered) >= block:
                    done, gathered = score(gathered[:block], done), gathered[block:]
                continue
            if gathered:
                done, gathered = score(gathered, done), []
            for lo in range(start, start + n, block):
                done = score(slice(lo, min(start + n, lo + block)), done)
        if gathered:
            score(gathered, done)
        # One device-to-host copy per batch; per-row sums on CPU in a fixed order: reproducible on any device.
        token_lp = -torch.cat(pieces).double().cpu()
        out, start = [], 0
        for n in lengths:
            out.append(float(token_lp[start : start + n].sum()))
            start += n
        return out


def _neg_log_softmax_at_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[target] per row, as cross-entropy computes it; overwrites ``logits``."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(1, keepdim=True)
    log_sum = logits.sub_(top).exp_().sum(1).log_()
    return log_sum.add_(top.squeeze(1)).sub_(picked)
