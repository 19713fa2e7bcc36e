"""Synthetic token stream: a learnable toy language for tests, demos and benchmarks.

Every sample is a random walk on a fixed sparse "grammar": token ``t`` is
followed by one of ``successors`` tokens chosen once per seed, and the first
token and the successor tables follow a Zipf distribution.  A small model
quickly learns the skewed unigram and then the bigram structure, so the loss
falls visibly within a few dozen steps -- a real learning signal, unlike
uniform noise.

Reproducibility is the point:

- sample ``i`` of a run depends only on ``(seed, i)`` (numpy's PCG64 seeded with
  both), never on the batch it lands in;
- data-parallel rank ``r`` of ``W`` reads, for its ``b``-th local batch of ``L``
  samples, the global samples ``b*L*W + r*L ... + L - 1``; so one global batch
  holds the same samples whatever the DP degree, and a run can resume on a
  different DP degree at the same global sample;
- the state is a single counter of global samples consumed (``state_dict``),
  identical on every rank.
"""

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torchtitan.components.dataloader import BaseDataLoader


@dataclass
class SyntheticConfig:
    """The ``[synthetic]`` section: used when ``[training].dataset = "synthetic"``."""

    seed: int = 0
    """Picks the toy language and the sample stream."""

    successors: int = 4
    """How many distinct tokens may follow each token (the bigram branching factor)."""

    zipf_exponent: float = 1.1
    """Skew of the unigram distribution; 0 makes it uniform."""

    replicate_across_dp: bool = False
    """Give every data-parallel rank the same samples (for tests of DP-degree invariance)."""


class ToyLanguage:
    """The fixed grammar of one seed: a Zipf start distribution and successor tables."""

    def __init__(self, vocab_size: int, config: SyntheticConfig):
        if vocab_size < 2:
            raise ValueError(f"synthetic data needs vocab_size >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.config = config
        rng = np.random.default_rng([config.seed, 0x5EED])
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        probs = ranks ** -config.zipf_exponent
        self.probs = probs / probs.sum()
        # Which token gets which Zipf rank: a fixed random relabelling.
        self.token_of_rank = rng.permutation(vocab_size)
        k = max(1, min(config.successors, vocab_size))
        self.successors = self.token_of_rank[
            rng.choice(vocab_size, size=(vocab_size, k), p=self.probs)
        ]

    def sample(self, index: int, length: int) -> np.ndarray:
        """Global sample ``index``: ``length`` tokens, a function of (seed, index) only."""
        rng = np.random.default_rng([self.config.seed, 1, index])
        tokens = np.empty(length, dtype=np.int64)
        tokens[0] = self.token_of_rank[rng.choice(self.vocab_size, p=self.probs)]
        picks = rng.integers(0, self.successors.shape[1], size=length - 1)
        for t in range(1, length):
            tokens[t] = self.successors[tokens[t - 1], picks[t - 1]]
        return tokens


class SyntheticDataLoader(BaseDataLoader):
    """torchtitan's stateful dataloader interface over the toy language.

    Yields ``({"input": tokens[L, S]}, labels[L, S])`` with labels the next tokens.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        config: SyntheticConfig,
    ):
        self.language = ToyLanguage(vocab_size, config)
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.replicate = config.replicate_across_dp
        self.samples_consumed = 0  # global samples, over all DP ranks

    @property
    def global_batch_samples(self) -> int:
        """Samples one local batch on every rank consumes from the global stream."""
        return self.local_batch_size * (1 if self.replicate else self.dp_world_size)

    def batch_at(self, global_start: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        first = global_start + (0 if self.replicate else self.dp_rank * self.local_batch_size)
        rows = [self.language.sample(first + j, self.seq_len + 1) for j in range(self.local_batch_size)]
        tokens = torch.from_numpy(np.stack(rows))
        return {"input": tokens[:, :-1].contiguous()}, tokens[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:  # an endless stream; training length comes from [training].steps
            batch = self.batch_at(self.samples_consumed)
            self.samples_consumed += self.global_batch_samples
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"samples_consumed": self.samples_consumed, "seed": self.language.config.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return  # torchtitan passes {} when a checkpoint has no dataloader state
        if state_dict.get("seed", self.language.config.seed) != self.language.config.seed:
            raise ValueError(
                f"synthetic.seed: checkpoint was written with seed {state_dict['seed']}, "
                f"this run uses {self.language.config.seed}"
            )
        consumed = int(state_dict["samples_consumed"])
        if consumed % self.global_batch_samples:
            raise ValueError(
                f"training.local_batch_size: resuming at global sample {consumed}, which is not a "
                f"multiple of this run's {self.global_batch_samples} samples per local batch"
            )
        self.samples_consumed = consumed
