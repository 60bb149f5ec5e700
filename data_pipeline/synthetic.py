"""A built-in corpus for the default job and tests: token sequences generated from
(seed, global sample index), so any position can be produced without replay.

Each sequence counts with a hidden stride: x[i+1] = (x[i] + b) mod m, b drawn per
sequence. The stride has to be inferred from the prefix, which a tiny model learns in a
minute on a CPU, and which it does better with two latent iterations than with one.
"""
from __future__ import annotations

import numpy as np
import torch


def synthetic_sample(seed: int, index: int, seq_len: int, vocab_size: int) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    modulus = int(min(vocab_size, 61))
    stride, start = int(rng.integers(1, 6)), int(rng.integers(0, modulus))
    return (start + stride * np.arange(seq_len + 1, dtype=np.int64)) % modulus


class SyntheticStream:
    """Batches for one rank out of a global sample order; the state is the global position."""

    def __init__(self, seq_len: int, vocab_size: int, micro_batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.seq_len, self.vocab_size, self.micro_batch_size = seq_len, vocab_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0  # samples consumed by all ranks together

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.micro_batch_size
        rows = [synthetic_sample(self.seed, first + i, self.seq_len, self.vocab_size)
                for i in range(self.micro_batch_size)]
        self.position += self.world_size * self.micro_batch_size
        tokens = torch.from_numpy(np.stack(rows))
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": 0}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
