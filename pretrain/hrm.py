"""HRM's two-timescale core (Hierarchical Reasoning Model, arXiv 2506.21734) as an optional
core of the recurrent-depth model (`model.low_level_steps` = T > 0).

The latent state holds two parts, [z_H | z_L] (width 2h). One core iteration (one unit of
`num_steps`) is one high-level update:

    T times:  z_L <- L(z_L + z_H + e)                 the low-level module, fast timescale
    once:     z_H <- H(adapter(concat[z_H, z_L]))      the high-level module = the core block

with e the prelude's output. HRM's one-step gradient: of the T low-level updates only the
last carries autograd, so a grad iteration backpropagates through one L and one H update
(the `num_steps=(n, k)` split still decides which high-level updates have autograd at all).
The coda and the exit gate read z_H. Everything else (sampler, objectives, TP, ZeRO,
checkpoints) is the same model; only the Huginn export has no such core and refuses it.
"""
from __future__ import annotations

import torch


def high_level(state: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """z_H of a two-timescale state (the state itself for the plain core)."""
    return state[..., :hidden_size] if state.shape[-1] != hidden_size else state


def initial_state(model, embedded: torch.Tensor, init_scale: float, generator) -> torch.Tensor:
    """[z_H | z_L], each drawn like the plain core's state."""
    return torch.cat([model.draw_state(embedded, init_scale, generator),
                      model.draw_state(embedded, init_scale, generator)], dim=-1)


def core_step(model, state: torch.Tensor, embedded: torch.Tensor, cos_sin: torch.Tensor, cache, step: int) -> torch.Tensor:
    """One high-level update: T low-level updates (the last one with autograd), then H."""
    hidden = embedded.shape[-1]
    z_high, z_low = state[..., :hidden], state[..., hidden:]
    steps = model.config.low_level_steps

    def low(z: torch.Tensor, t: int) -> torch.Tensor:
        x = z + z_high + embedded
        for block in model.transformer.low_block:
            x = block(x, cos_sin, cache, step * steps + t)
        return x

    with torch.no_grad():
        for t in range(steps - 1):
            z_low = low(z_low, t)
    z_low = low(z_low, steps - 1)
    x = model.ops.injection(z_high, z_low, model.transformer.adapter.weight)
    for block in model.transformer.core_block:
        x = block(x, cos_sin, cache, step)
    return torch.cat([x, z_low], dim=-1)
