"""The per-step depth draw: a pure function of (seed, step), identical on every rank.

rate ~ LogNormal(mu, sigma) with mu = ln(t + s) - sigma^2 / 2 so that E[rate] = t + s;
p = Poisson(rate) + 1; n = max(p - s, 0) iterations without autograd, k = min(s, p) with it.

A recurrence curriculum (objective.curriculum_steps > 0) replaces the mean t + s at step
`step` < N = curriculum_steps by start + (t + s - start) * f(step / N), with f(x) = x
("linear") or f(x) = 1 - sqrt(1 - x) ("1-sqrt": slow at first, fastest at the end of the
ramp); still a pure function of (seed, step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DepthSampler:
    mean_recurrence: int
    backprop_depth: int
    sigma: float = 0.5
    seed: int = 0
    curriculum_steps: int = 0
    curriculum: str = "linear"
    curriculum_start: float = 1.0

    @classmethod
    def from_config(cls, model_cfg, seed: int, objective_cfg=None) -> "DepthSampler":
        ramp = {}
        if objective_cfg is not None:
            ramp = dict(curriculum_steps=objective_cfg.curriculum_steps, curriculum=objective_cfg.curriculum,
                        curriculum_start=objective_cfg.curriculum_start)
        return cls(model_cfg.mean_recurrence, model_cfg.mean_backprop_depth, model_cfg.depth_sigma, seed, **ramp)

    @property
    def mu(self) -> float:
        # t + s of the spec is the mean recurrence (24 + 8 = 32 for the 3.5B preset)
        return math.log(self.mean_recurrence) - self.sigma ** 2 / 2

    def mean_at(self, step: int) -> float:
        """The mean recurrence the draw at `step` aims for (the curriculum's ramp, then flat)."""
        if step >= self.curriculum_steps:
            return float(self.mean_recurrence)
        x = step / self.curriculum_steps
        shape = x if self.curriculum == "linear" else 1 - math.sqrt(1 - x)
        return self.curriculum_start + (self.mean_recurrence - self.curriculum_start) * shape

    def __call__(self, step: int) -> tuple[int, int]:
        # a fresh generator keyed by (seed, step): no state to carry, no communication
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        mu = self.mu if step >= self.curriculum_steps else math.log(self.mean_at(step)) - self.sigma ** 2 / 2
        rate = rng.lognormal(mu, self.sigma)
        p = int(rng.poisson(rate)) + 1
        return max(p - self.backprop_depth, 0), min(self.backprop_depth, p)

    def distribution(self, max_depth: int = 1024, grid: int = 4000) -> dict[int, float]:
        """P(p = r) for r = 1..max_depth, by integrating Poisson(rate) over the log-normal
        density of rate (used for expected FLOPs, not for sampling)."""
        from scipy import stats  # noqa: PLC0415 (only the planner needs scipy)

        qs = (np.arange(grid) + 0.5) / grid
        rates = stats.lognorm.ppf(qs, s=self.sigma, scale=math.exp(self.mu))
        depths = np.arange(0, max_depth)
        pmf = stats.poisson.pmf(depths[:, None], rates[None, :]).mean(axis=1)
        return {int(d) + 1: float(pr) for d, pr in zip(depths, pmf)}
