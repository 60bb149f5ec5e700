"""Shared fixtures. Every test builds its own small data; nothing is downloaded."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_config():
    from rdp.pretrain.config import load_config

    return load_config("tiny")


@pytest.fixture
def micro_model_config():
    """Smaller than `tiny`: for tests that run many forwards."""
    from rdp.pretrain.config import load_config

    return load_config("tiny", ["model.hidden_size=32", "model.num_heads=2", "model.intermediate_size=48",
                                "model.vocab_size=64", "model.bos_token_id=60", "model.eos_token_id=61",
                                "model.end_turn_token_id=62", "model.pad_token_id=63"]).model
