"""The per-step depth draw: a pure function of (seed, step), identical on every rank.

rate ~ LogNormal(mu, sigma) with mu = ln(t + s) - sigma^2 / 2 so that E[rate] = t + s;
p = Poisson(rate) + 1; n = max(p - s, 0) iterations without autograd, k = min(s, p) with it.
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

    @classmethod
    def from_config(cls, model_cfg, seed: int) -> "DepthSampler":
        return cls(model_cfg.mean_recurrence, model_cfg.mean_backprop_depth, model_cfg.depth_sigma, seed)

    @property
    def mu(self) -> float:
        # t + s of the spec is the mean recurrence (24 + 8 = 32 for the 3.5B preset)
        return math.log(self.mean_recurrence) - self.sigma ** 2 / 2

    def __call__(self, step: int) -> tuple[int, int]:
        # a fresh generator keyed by (seed, step): no state to carry, no communication
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        rate = rng.lognormal(self.mu, self.sigma)
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
