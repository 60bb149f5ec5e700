"""What the distributed tests share: a loss whose gradient (or value) turns non-finite at
chosen steps, to drive the skip-the-step path on one rank or all."""
from __future__ import annotations

import torch


class NanGradient(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def faulty_loss_forward(original, nan_gradient_at=(), nan_loss_at=()):
    """A replacement for `engine.LossOnly.forward` that counts its calls (one per micro-batch)
    and at the given calls returns a finite loss with a NaN gradient, or a NaN loss."""
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        if calls["n"] in nan_gradient_at:
            return NanGradient.apply(loss)
        if calls["n"] in nan_loss_at:
            return loss * float("nan")
        return loss

    return forward
