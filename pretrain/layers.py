"""The layer types a model is built from.

Tensor parallelism enters only here, keeping the model free of it: the model asks a `LayerKit`
for its linears, embedding and head, and the blocks read the same at any TP degree.
`LocalLayers` is the single-device kit; `pretrain.parallel` provides the megatron-core one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rdp.kernels.cpu_linear import linear


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Normal(0, std) truncated at +-3 std (the spec's "takase" init)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std)


class Linear(nn.Linear):
    """Bias-free linear that remembers its init std so re-initialisation is one call."""

    def __init__(self, in_features: int, out_features: int, init_std: float):
        self.init_std = init_std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            trunc_normal_(self.weight, self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)  # oneDNN on CPU (faster GEMMs there), else F.linear


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float):
        self.init_std = init_std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            trunc_normal_(self.weight, self.init_std)


class LocalLayers:
    """Single-device kit: plain torch layers, full vocab logits."""

    tp_size = 1

    def column_linear(self, in_features: int, out_features: int, init_std: float, interleave: int = 1) -> nn.Module:
        # interleave: how many equal parts the output holds ([q|k|v] = 3, [gate|up] = 2), so a
        # sharded kit can give every rank a matching slice of each part; irrelevant at TP=1
        return Linear(in_features, out_features, init_std)

    def row_linear(self, in_features: int, out_features: int, init_std: float) -> nn.Module:
        return Linear(in_features, out_features, init_std)

    def embedding(self, vocab_size: int, hidden_size: int, init_std: float) -> nn.Module:
        return Embedding(vocab_size, hidden_size, init_std)

    def head(self, vocab_size: int, hidden_size: int, init_std: float) -> nn.Module:
        """An untied output head (model.tie_embeddings=false); its weight is (vocab, hidden)."""
        return Linear(hidden_size, vocab_size, init_std)

    def head_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits from the head weight (the tied embedding's by default)."""
        return F.linear(x, weight).float()

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)

    def loss(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ops) -> torch.Tensor:
        """Loss without returning logits: the kernel backend's chunked head + cross-entropy."""
        return ops.linear_cross_entropy(x, weight, labels)

    def token_losses(self, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token cross-entropy (0 where labels == -100) and whether the label's logit is the
        largest (ties count as right), for the objectives that weight tokens separately."""
        logits = self.head_logits(x, weight)
        with torch.no_grad():
            label_logit = logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
            correct = label_logit >= logits.max(-1).values
        losses = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none")
        return losses.view(labels.shape), correct


def takase_std(hidden_size: int) -> float:
    return math.sqrt(2.0 / (5.0 * hidden_size))
