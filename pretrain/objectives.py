"""Training objectives over the recurrence (docs/objectives.md): what a step's loss is made of.

| objective.loss  | loss of one segment, over the states s_1..s_T after the T = k grad iterations  |
|-----------------|---------------------------------------------------------------------------------|
| last            | CE(decode(s_T)): truncated backprop, huginn-0125's objective                      |
| every           | mean_t CE(decode(s_t)): deep supervision, a loss after every grad iteration       |
| expected_exit   | sum_t p_t CE_t - beta H(p) per token, p the exit gate's distribution (Ouro/LoopLM) |

p_t = lambda_t prod_{j<t} (1 - lambda_j) for t < T and p_T = prod_{j<T} (1 - lambda_j), with
lambda_t = sigmoid(exit gate(s_t)) the hazard of stopping after iteration t. The window starts
after the n no-grad iterations, so the gate learns hazards conditional on having run n.

`halting_weight` adds a binary cross-entropy of the gate's logit at each iteration the loss
decodes against whether that iteration already predicts the token right (HRM/TRM halting):
target_t = [logit_t(label) >= max logit_t], per scored token.

`fixed_point_weight` w adds w * mean over tokens and consecutive grad iterations of
||s_{t+1} - s_t||^2 / ||s_t||^2 (the denominator not differentiated): a pull toward a fixed point
of the recurrence, so that iterations past the ones a problem needs leave the state, and so the
answer, where it is (against "overthinking"). No pair, no term: k = 1 adds nothing.

`segments` = M runs the whole (n, k) recurrence M times, each segment starting from the
previous segment's final state detached (HRM's deep supervision), and averages their losses.
All segments share one backward and one optimizer step: a step stays one batch, so the depth
draw, learning rate and data position stay functions of the step (a resumed run repeats them).

Losses are means over scored tokens (labels != -100), like the plain loss, so `last` with one
segment and no halting is exactly the model's default loss (the model takes that path itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rdp.pretrain.config import ObjectiveConfig


@dataclass(frozen=True)
class Objective:
    loss: str = "last"
    segments: int = 1
    exit_entropy_weight: float = 0.0
    halting_weight: float = 0.0
    fixed_point_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig) -> "Objective":
        return cls(cfg.loss, cfg.segments, cfg.exit_entropy_weight, cfg.halting_weight, cfg.fixed_point_weight)

    @property
    def plain(self) -> bool:
        """The model's default loss (truncated backprop through the last k iterations)."""
        return self.loss == "last" and self.segments == 1 and self.halting_weight == 0 and self.fixed_point_weight == 0

    @property
    def per_token(self) -> bool:
        """Needs per-token losses (the fused mean cross-entropy does not give them)."""
        return self.loss == "expected_exit" or self.halting_weight > 0

    def decoded(self, k: int) -> int:
        """How many states one segment decodes (FLOPs accounting)."""
        return 1 if self.loss == "last" or k <= 1 else k

    def gated(self, k: int) -> int:
        """How many states one segment runs the exit gate on (FLOPs accounting)."""
        decoded = self.decoded(k)
        if self.halting_weight > 0:
            return decoded
        return decoded - 1 if self.loss == "expected_exit" else 0

    def __call__(self, model, embedded: torch.Tensor, state: torch.Tensor, cos_sin: torch.Tensor,
                 labels: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(final state, loss) of a training forward from the initial state."""
        total = None
        for segment in range(self.segments):
            states = model.iterate(state.detach() if segment else state, embedded, cos_sin, n, k)
            state = states[-1]
            loss = self.segment_loss(model, states, cos_sin, labels)
            total = loss if total is None else total + loss
        return state, total / self.segments

    def segment_loss(self, model, states: list[torch.Tensor], cos_sin: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
        loss = self.task_loss(model, states, cos_sin, labels)
        if self.fixed_point_weight > 0 and len(states) > 1:
            loss = loss + self.fixed_point_weight * relative_state_change(states)
        return loss

    def task_loss(self, model, states: list[torch.Tensor], cos_sin: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
        """The loss on the labels (and the halting head's) of one segment's grad states."""
        supervised = states[-1:] if self.loss == "last" else states
        weight = model.head_weight
        if not self.per_token:
            losses = [model.kit.loss(model.decode(s, cos_sin), weight, labels, model.ops) for s in supervised]
            return torch.stack(losses).mean()
        per_token = [model.kit.token_losses(model.decode(s, cos_sin), weight, labels) for s in supervised]
        ce = torch.stack([loss for loss, _ in per_token])  # (T, batch, seq), 0 where not scored
        scored = labels != -100
        count = scored.sum()
        gated = supervised if self.halting_weight > 0 else supervised[:-1]
        gate = torch.stack([model.exit_logits(s) for s in gated]) if gated else None
        if self.loss == "last" or len(supervised) == 1:  # one iteration: p = 1, no entropy
            loss = ce[-1].sum() / count
        elif self.loss == "every":
            loss = ce.mean(0).sum() / count
        else:
            log_p = exit_log_distribution(gate[:len(supervised) - 1], len(supervised))
            p = log_p.exp()
            entropy = -(p * log_p).sum(0)
            loss = ((p * ce).sum(0) - self.exit_entropy_weight * entropy).masked_fill(~scored, 0).sum() / count
        if self.halting_weight > 0:
            correct = torch.stack([c for _, c in per_token]).float()
            bce = F.binary_cross_entropy_with_logits(gate, correct, reduction="none")
            loss = loss + self.halting_weight * bce.masked_fill(~scored, 0).sum() / (count * len(supervised))
        return loss


def relative_state_change(states: list[torch.Tensor]) -> torch.Tensor:
    """mean over tokens and consecutive iterations of ||s_{t+1} - s_t||^2 / ||s_t||^2, the
    denominator a constant (so the term cannot shrink by growing the state)."""
    changes = [(later - earlier).float().pow(2).sum(-1) / earlier.detach().float().pow(2).sum(-1).clamp_min(1e-12)
               for earlier, later in zip(states, states[1:])]
    return torch.stack(changes).mean()


def exit_log_distribution(exit_logits: torch.Tensor, steps: int) -> torch.Tensor:
    """log p_t over `steps` iterations from the gate logits of the first steps - 1 (the last
    iteration takes the remaining mass): shape (steps, ...). In log space: log lambda =
    logsigmoid(z), log(1 - lambda) = logsigmoid(-z), exact for saturated gates."""
    if steps == 1:
        return torch.zeros((1, *exit_logits.shape[1:]), dtype=torch.float32, device=exit_logits.device)
    z = exit_logits.float()
    survive = torch.cumsum(F.logsigmoid(-z), 0)  # log prod_{j<=t} (1 - lambda_j)
    before = torch.cat([torch.zeros_like(survive[:1]), survive[:-1]])
    return torch.cat([before + F.logsigmoid(z), survive[-1:]])
