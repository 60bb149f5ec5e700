"""Tokenizers, WebDataset shards and the resumable streaming loader."""
from __future__ import annotations


def build_stream(data_cfg, vocab_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1):
    """The training stream for one data-parallel rank: `next_batch()` gives (inputs, labels),
    `state_dict()` / `load_state_dict()` hold the global position."""
    if data_cfg.source == "synthetic":
        from data_pipeline.synthetic import SyntheticStream

        return SyntheticStream(data_cfg.seq_len, vocab_size, micro_batch_size, data_cfg.seed, rank, world_size)
    raise ValueError(f"data.source={data_cfg.source!r} is not available yet")
