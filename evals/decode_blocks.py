"""The model's blocks for the decoder, in fewer tensor operations and the same arithmetic.

Generating from a small model on a CPU costs per tensor operation, not per FLOP: a block
call on a few query positions takes ~60 operations of a few microseconds each, and a token
at depth 8 passes 18 block calls. `LeanBlocks` runs a `SandwichBlock` (and the embedding,
injection and final norm around it) with the reference kernels' arithmetic, element for
element, in about a quarter fewer operations and without module calls:

- the rotary table is laid out once per decoder, as (cos, cos) and (-sin, sin) per pair, so
  q and k rotate together in four operations: pair * cos2 + swapped pair * sin2 gives
  even*cos + odd*(-sin) and odd*cos + even*sin, which in IEEE arithmetic equal the
  reference's even*cos - odd*sin and odd*cos + even*sin bit for bit;
- q and k get their biases in one addition, every linear is a plain call of the model's own
  linear function (`rdp.kernels.cpu_linear.linear`: oneDNN on CPU, as in `pretrain.layers.Linear`);
- RMSNorm skips the fp32 round trips that are no-ops on fp32 activations.

The results are bit-identical to the model's own blocks (tests/test_evals_generation.py
compares them with `torch.equal`). It applies to fp32 models on the reference kernels
(`model.kernels` resolving to torch, as on every CPU) with an unsharded kit and the plain
core; everywhere else `LeanBlocks.applies` is False and the decoder calls the model's
modules, which give the same tokens a little slower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rdp.kernels.cpu_linear import linear


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    # reference.rms_norm on fp32 input: x.float() and type_as(x) are identities there
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


class LeanBlocks:
    def __init__(self, model):
        self.model = model
        cfg = model.config
        blocks = [*model.transformer.prelude, *model.transformer.core_block, *model.transformer.coda]
        self.applies = (model.ops.backend == "torch" and model.kit.tp_size == 1 and not cfg.low_level_steps
                        and model.transformer.wte.weight.dtype == torch.float32
                        and all(isinstance(m, nn.Linear) for b in blocks
                                for m in (b.attn.Wqkv, b.attn.proj, b.mlp.fc, b.mlp.proj)))
        if not self.applies:
            return
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        cos, sin = model.cos_sin.unbind(-1)  # (max_seq_len, head_dim // 2) each
        # (position, 1, 1, head_dim // 2, 2): broadcasts over (batch, seq, q|k, heads, pairs, 2)
        self.cos2 = torch.stack([cos, cos], -1)[:, None, None]
        self.sin2 = torch.stack([-sin, sin], -1)[:, None, None]

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos2[start:start + length], self.sin2[start:start + length]

    def block(self, block, x: torch.Tensor, rope, cache, step: int) -> torch.Tensor:
        """block(x, cos_sin, cache, step) for `rope = self.rope(position, seq)`."""
        batch, seq, hidden = x.shape
        attn = block.attn
        qkv = linear(_rms(x, block.norm_1), attn.Wqkv.weight).view(batch, seq, 3, self.heads, self.head_dim)
        qk = qkv[:, :, :2]
        if attn.qk_bias is not None:
            qk = qk + attn.qk_bias.view(2, self.heads, self.head_dim)
        pairs = qk.unflatten(-1, (-1, 2))
        cos2, sin2 = rope
        qk = (pairs * cos2 + pairs.flip(-1) * sin2).flatten(-2)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        k, v = cache.update((block.layer_id, step), k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attention_mask(seq, k.shape[-2]))
        x = _rms(x + linear(y.transpose(1, 2).reshape(batch, seq, hidden), attn.proj.weight), block.norm_2)
        gate, up = linear(_rms(x, block.norm_3), block.mlp.fc.weight).chunk(2, dim=-1)
        return _rms(x + linear(F.silu(gate) * up, block.mlp.proj.weight), block.norm_4)

    def prelude(self, ids: torch.Tensor, rope, cache) -> torch.Tensor:
        x = self.model.embed(ids)
        for block in self.model.transformer.prelude:
            x = self.block(block, x, rope, cache, 0)
        return x

    def core_step(self, state: torch.Tensor, embedded: torch.Tensor, rope, cache, step: int) -> torch.Tensor:
        # the model's split adapter (s W_s^T + e W_e^T, pretrain/model.py), the same sum
        weight, hidden = self.model.transformer.adapter.weight, state.shape[-1]
        x = F.linear(state, weight[:, :hidden]) + F.linear(embedded, weight[:, hidden:])
        for block in self.model.transformer.core_block:
            x = self.block(block, x, rope, cache, step)
        return x

    def decode(self, state: torch.Tensor, rope, cache) -> torch.Tensor:
        ln_f = self.model.transformer.ln_f
        x = _rms(state, ln_f)
        for block in self.model.transformer.coda:
            x = self.block(block, x, rope, cache, 0)
        return _rms(x, ln_f)
