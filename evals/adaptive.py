"""Per-token adaptive exit: stop a token's recurrence once successive steps agree.

The criteria follow huginn-0125's evaluation (spec, "Evaluation at test-time depth"):

| name             | value compared against the threshold (exit when it falls below)     |
|------------------|-----------------------------------------------------------------------|
| kl               | KL(p_prev || p_now) of the next-token distributions                    |
| entropy-diff     | |H(p_now) - H(p_prev)|                                                 |
| latent-diff      | ||s_now - s_prev|| / ||s_now||                                         |
| cosine           | 1 - cos(s_now, s_prev)                                                |
| argmax-stability | exit once the argmax stayed the same for `threshold` steps in a row   |

A threshold <= 0 never exits, so the token runs the full depth.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CRITERIA = ("kl", "entropy-diff", "latent-diff", "argmax-stability", "cosine")
DEFAULT_THRESHOLDS = {"kl": 5e-4, "entropy-diff": 1e-3, "latent-diff": 0.03, "argmax-stability": 5, "cosine": 1e-3}


class ExitCriterion:
    """Stateful per-token test; `reset()` before each token, `update()` after each step."""

    def __init__(self, name: str, threshold: Optional[float] = None):
        if name not in CRITERIA:
            raise ValueError(f"exit criterion must be one of {', '.join(CRITERIA)}, got {name!r}")
        self.name = name
        self.threshold = DEFAULT_THRESHOLDS[name] if threshold is None else float(threshold)
        self.needs_logits = name in ("kl", "entropy-diff", "argmax-stability")
        self.reset()

    def reset(self) -> None:
        self.prev_state: Optional[torch.Tensor] = None
        self.prev_logp: Optional[torch.Tensor] = None
        self.stable_steps = 0

    def update(self, state: torch.Tensor, logits: Optional[torch.Tensor]) -> bool:
        """True when the token may stop after this step. state: (h,), logits: (vocab,)."""
        state = state.float()
        logp = F.log_softmax(logits.float(), dim=-1) if logits is not None else None
        done = False
        if self.prev_state is not None and self.threshold > 0:
            done = self._value_below(state, logp)
        self.prev_state, self.prev_logp = state, logp
        return done

    def _value_below(self, state: torch.Tensor, logp: Optional[torch.Tensor]) -> bool:
        if self.name == "kl":
            value = torch.sum(self.prev_logp.exp() * (self.prev_logp - logp))
        elif self.name == "entropy-diff":
            entropy = lambda lp: -(lp.exp() * lp).sum()  # noqa: E731
            value = (entropy(logp) - entropy(self.prev_logp)).abs()
        elif self.name == "latent-diff":
            value = (state - self.prev_state).norm() / state.norm().clamp_min(1e-12)
        elif self.name == "cosine":
            value = 1 - F.cosine_similarity(state, self.prev_state, dim=-1)
        else:  # argmax-stability counts steps, the threshold is how many
            same = bool(logp.argmax() == self.prev_logp.argmax())
            self.stable_steps = self.stable_steps + 1 if same else 0
            return self.stable_steps >= self.threshold
        return float(value) < self.threshold
