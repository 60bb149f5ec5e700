"""model.compile: torch.compile (Inductor) of the core iteration, prelude and decoder trains
like eager, with truncated backprop and activation checkpointing, and compiles once per
graph however the sampler draws (n, k)."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch._dynamo.utils import counters

from rdp.pretrain.model import build_model
from rdp.pretrain.sampler import DepthSampler


def _train(model, batches, depths):
    torch.manual_seed(0)  # the random initial states: the same draws for both models
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for (tokens, labels), (n, k) in zip(batches, depths):
        loss = model(tokens, labels=labels, num_steps=(n, k), return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_training_equals_eager_and_compiles_once_for_all_depths(micro_model_config):
    cfg = replace(micro_model_config, activation_checkpointing=True)
    sampler = DepthSampler.from_config(cfg, seed=0)
    depths = [sampler(step) for step in range(6)]
    depths += [(0, 1), (5, 2)]  # k = 1 and n > 0 whatever the draws were
    assert len(set(depths)) >= 4, depths
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, cfg.vocab_size, (2, 16), generator=generator),
                torch.randint(0, cfg.vocab_size, (2, 16), generator=generator)) for _ in depths]

    eager = build_model(cfg, seed=0)
    compiled = build_model(replace(cfg, compile=True), seed=0)
    torch._dynamo.reset()
    counters.clear()
    eager_losses = _train(eager, batches, depths)
    compiled_losses = _train(compiled, batches, depths)

    # fused kernels round differently from eager ones; the trajectory must stay the same
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=2e-5, atol=2e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    # graphs: encode, decode, and the core step without autograd, with autograd from the
    # detached state of the last no-grad step, and with autograd from a grad state (grad mode
    # and requires_grad are guards); the step number and (n, k) are not
    assert counters["stats"]["unique_graphs"] == 5, dict(counters["stats"])
    more = [(9, 2), (1, 3), (12, 1)]
    _train(compiled, batches[:len(more)], more)
    assert counters["stats"]["unique_graphs"] == 5, dict(counters["stats"])
