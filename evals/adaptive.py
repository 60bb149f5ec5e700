"""Per-token adaptive exit: stop a token's recurrence once successive steps agree.

The criteria follow huginn-0125's evaluation (spec, "Evaluation at test-time depth"):

| name             | value compared against the threshold (exit when it falls below)     |
|------------------|-----------------------------------------------------------------------|
| kl               | KL(p_prev || p_now) of the next-token distributions                    |
| entropy-diff     | |H(p_now) - H(p_prev)|                                                 |
| latent-diff      | ||s_now - s_prev|| / ||s_now||                                         |
| cosine           | 1 - cos(s_now, s_prev)                                                |
| argmax-stability | exit once the argmax stayed the same for `threshold` steps in a row   |
| learned          | exit once the exit gate's CDF 1 - prod_t (1 - lambda_t) reaches q = threshold |

A threshold <= 0 never exits, so the token runs the full depth. `learned` needs a model
trained with an exit gate (model.exit_gate, docs/objectives.md); q is in (0, 1] and it may
exit after the first iteration; it reads no logits, so it costs one tiny linear per step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

CRITERIA = ("kl", "entropy-diff", "latent-diff", "argmax-stability", "cosine", "learned")
DEFAULT_THRESHOLDS = {"kl": 5e-4, "entropy-diff": 1e-3, "latent-diff": 0.03, "argmax-stability": 5, "cosine": 1e-3,
                      "learned": 0.5}


class ExitCriterion:
    """Stateful per-token test; `reset()` before each token, `update()` after each step."""

    def __init__(self, name: str, threshold: Optional[float] = None):
        if name not in CRITERIA:
            raise ValueError(f"exit criterion must be one of {', '.join(CRITERIA)}, got {name!r}")
        self.name = name
        self.threshold = DEFAULT_THRESHOLDS[name] if threshold is None else float(threshold)
        if name == "learned" and not 0 < self.threshold <= 1:
            raise ValueError(f"exit threshold of the learned exit is a CDF level q in (0, 1], got {self.threshold}")
        self.needs_logits = name in ("kl", "entropy-diff", "argmax-stability")
        self.needs_gate = name == "learned"
        self.reset()

    def reset(self) -> None:
        self.prev_state: Optional[torch.Tensor] = None
        self.prev_logp: Optional[torch.Tensor] = None
        self.stable_steps = 0
        self.log_survival = 0.0  # log prod (1 - lambda_t) so far (learned exit)

    def update(self, state: torch.Tensor, logits: Optional[torch.Tensor], exit_logit: Optional[torch.Tensor] = None) -> bool:
        """True when the token may stop after this step. state: (h,), logits: (vocab,),
        exit_logit: the exit gate's logit (scalar) for `learned`."""
        if self.needs_gate:
            self.log_survival += float(F.logsigmoid(-exit_logit.float()))
            return exit_cdf_reached(torch.tensor(self.log_survival), self.threshold).item()
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


def exit_cdf_reached(log_survival: torch.Tensor, q: float) -> torch.Tensor:
    """1 - prod (1 - lambda) >= q, from log prod (1 - lambda)."""
    return log_survival <= math.log1p(-q) if q < 1 else log_survival == float("-inf")


@torch.no_grad()
def learned_exit_forward(model, input_ids: torch.Tensor, max_depth: int, q: float,
                         init_scale: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One full-sequence forward where each position stops iterating once its exit gate's
    CDF reaches q (or at max_depth): a stopped position keeps its state, which the others
    still attend to. Returns (logits, iterations used per position). For tasks scored in one
    forward (evals/reasoning.py); generation exits token by token in evals/runner.py."""
    (_, logits, steps), = learned_exit_depths(model, input_ids, [max_depth], q, init_scale)
    return logits, steps


@torch.no_grad()
def learned_exit_depths(model, input_ids: torch.Tensor, caps: list[int], q: float, init_scale: float = 0.0):
    """(cap, logits, iterations used per position) for every depth cap, from one pass of
    max(caps) iterations: where a position stops never depends on the cap (its own exit, or
    the cap itself), so the state at cap c is learned_exit_forward's with max_depth = c."""
    if not 0 < q <= 1:
        raise ValueError(f"exit threshold of the learned exit is a CDF level q in (0, 1], got {q}")
    cos_sin = model.cos_sin[:input_ids.shape[1]]
    embedded = model.embed(input_ids)
    for block in model.transformer.prelude:
        embedded = block(embedded, cos_sin)
    state = model.initial_state(embedded, init_scale)
    log_survival = torch.zeros(input_ids.shape, device=input_ids.device)
    steps = torch.zeros(input_ids.shape, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    step = 0
    for cap in sorted(set(caps)):
        while step < cap and not bool(done.all()):
            state = torch.where(done[..., None], state, model.core_step(state, embedded, cos_sin, step=step))
            steps += ~done
            log_survival = log_survival + F.logsigmoid(-model.exit_logits(state))
            done = done | exit_cdf_reached(log_survival, q)
            step += 1
        yield cap, model.kit.head_logits(model.decode(state, cos_sin), model.head_weight), steps.clone()
