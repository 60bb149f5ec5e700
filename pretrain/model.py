"""The recurrent-depth transformer (huginn-0125 family): prelude, a core block iterated
on a latent state re-injected with the prelude's output, and a coda.

One forward serves training, evaluation and export alike:
`model(input_ids, num_steps=(n, k))` runs n core iterations without autograd, then k with it.
Parallelism lives in the `LayerKit` the model is built with; fused ops come from `kernels`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rdp.kernels import get_ops
from rdp.kernels.reference import rope_cos_sin
from rdp.pretrain import hrm
from rdp.pretrain.config import ModelConfig
from rdp.pretrain.layers import Linear, LocalLayers, takase_std, trunc_normal_


class KVCache(Protocol):
    """What attention needs of a cache: store this call's keys/values under `key` and
    return every key/value the queries may attend to, shaped (batch, heads, seq, head_dim)."""

    def update(self, key: tuple[int, int], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]
    loss: Optional[torch.Tensor]
    state: Optional[torch.Tensor]  # final latent state of the core block, before ln_f
    num_steps: tuple[int, int]


class RMSNorm(nn.Module):
    init_constants = {"weight": 1.0}  # how pretrain/init_weights.py starts it

    def __init__(self, dim: int, eps: float, ops):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """norm(x + update), fused where the kernel backend can."""
        return self.ops.add_rms_norm(x, update, self.weight, self.eps)


class Attention(nn.Module):
    init_constants = {"qk_bias": 0.0}

    def __init__(self, cfg: ModelConfig, kit, ops):
        super().__init__()
        h, std = cfg.hidden_size, takase_std(cfg.hidden_size) * cfg.init_std_scale
        self.head_dim = cfg.head_dim
        self.local_heads = cfg.num_heads // kit.tp_size
        self.ops = ops
        # output laid out [all q | all k | all v], head-major inside each part
        self.Wqkv = kit.column_linear(h, 3 * h, std, interleave=3)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.local_heads, self.head_dim)) if cfg.qk_bias else None
        self.proj = kit.row_linear(h, h, std / math.sqrt(2 * cfg.effective_depth))
        self.hidden_size = h

    def flops_per_token(self, seq_len: int, causal_skip: bool = False) -> int:
        """Forward matmul FLOPs per token (all heads, whole model width, any TP degree).
        Attention scores and values count full S x S products unless `causal_skip`."""
        h = self.hidden_size
        keys = (seq_len + 1) / 2 if causal_skip else seq_len
        return 2 * h * 3 * h + 2 * h * h + int(2 * 2 * keys * h)

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache] = None,
                cache_key: tuple[int, int] = (0, 0)) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.Wqkv(x).view(batch, seq, 3, self.local_heads, self.head_dim).unbind(2)
        q, k = self.ops.bias_rope(q, k, self.qk_bias, cos_sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if cache is not None:
            k, v = cache.update(cache_key, k, v)
            # a cache serving a left-padded batch hides the pad keys (evals/cache.py)
            mask = cache.attention_mask(seq, k.shape[-2]) if hasattr(cache, "attention_mask") else None
        if mask is None:
            y = self.ops.attention(q, k, v, causal=True)
        else:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kit, ops):
        super().__init__()
        h, std = cfg.hidden_size, takase_std(cfg.hidden_size) * cfg.init_std_scale
        self.ops = ops
        self.fc = kit.column_linear(h, 2 * cfg.intermediate_size, std, interleave=2)  # [gate | up]
        self.proj = kit.row_linear(cfg.intermediate_size, h, std / math.sqrt(2 * cfg.effective_depth))
        self.flops = 2 * h * 2 * cfg.intermediate_size + 2 * cfg.intermediate_size * h

    def flops_per_token(self) -> int:
        return self.flops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.ops.silu_mul(self.fc(x)))


class SandwichBlock(nn.Module):
    """x = norm_2(x + attn(norm_1(x))); x = norm_4(x + mlp(norm_3(x)))."""

    def __init__(self, cfg: ModelConfig, kit, ops, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.norm_1, self.norm_2, self.norm_3, self.norm_4 = (
            RMSNorm(cfg.hidden_size, cfg.norm_eps, ops) for _ in range(4))
        self.attn = Attention(cfg, kit, ops)
        self.mlp = GatedMLP(cfg, kit, ops)

    def flops_per_token(self, seq_len: int, causal_skip: bool = False) -> int:
        return self.attn.flops_per_token(seq_len, causal_skip) + self.mlp.flops_per_token()

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache] = None,
                step: int = 0) -> torch.Tensor:
        x = self.norm_2.add(x, self.attn(self.norm_1(x), cos_sin, cache, (self.layer_id, step)))
        return self.norm_4.add(x, self.mlp(self.norm_3(x)))


class ExitGate(nn.Linear):
    """The exit hazard of the latent state: lambda_t = sigmoid(w . rms(s_t) + b) is the
    probability of stopping after iteration t, given the recurrence ran that far. Replicated
    under TP (its input is full-width on every rank). The bias starts at -ln(mean backprop
    depth), so the untrained exit distribution spreads over the supervised iterations."""

    def __init__(self, hidden_size: int, init_std: float, eps: float, bias_init: float):
        self.init_std, self.eps, self.bias_init = init_std, eps, bias_init
        super().__init__(hidden_size, 1, bias=True)

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            trunc_normal_(self.weight, self.init_std)
            nn.init.constant_(self.bias, self.bias_init)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Exit logits (batch, seq) in fp32."""
        normed = torch.nn.functional.rms_norm(state, (state.shape[-1],), eps=self.eps)
        return super().forward(normed).squeeze(-1).float()

    def flops_per_token(self) -> int:
        return 2 * self.in_features


class RecurrentDepthModel(nn.Module):
    def __init__(self, cfg: ModelConfig, kit=None):
        super().__init__()
        self.config = cfg
        kit = kit or LocalLayers()
        self.kit = kit
        self.ops = get_ops(cfg.kernels)
        h, std = cfg.hidden_size, takase_std(cfg.hidden_size) * cfg.init_std_scale
        low_layers = cfg.low_level_layers if cfg.low_level_steps else 0
        layer_ids = iter(range(cfg.prelude_layers + cfg.core_layers + cfg.coda_layers + low_layers))

        def blocks(count: int) -> nn.ModuleList:
            return nn.ModuleList(SandwichBlock(cfg, kit, self.ops, next(layer_ids)) for _ in range(count))

        self.transformer = nn.ModuleDict(dict(
            wte=kit.embedding(cfg.vocab_size, h, std),
            prelude=blocks(cfg.prelude_layers),
            # replicated under TP: its inputs and output are full-width on every rank
            adapter=Linear(2 * h, h, std),
            core_block=blocks(cfg.core_layers),
            coda=blocks(cfg.coda_layers),
            ln_f=RMSNorm(h, cfg.norm_eps, self.ops),
        ))
        if cfg.exit_gate:
            self.transformer.exit_gate = ExitGate(h, std, cfg.norm_eps, -math.log(max(cfg.mean_backprop_depth, 1)))
        if cfg.low_level_steps:  # HRM's low-level module (pretrain/hrm.py)
            self.transformer.low_block = blocks(low_layers)
        # untied: a separate output head (Huginn's lm_head.weight), sharded like the embedding
        self.lm_head = None if cfg.tie_embeddings else kit.head(cfg.vocab_size, h, std)
        self.emb_scale = math.sqrt(h)
        self.state_std = takase_std(h)
        self.register_buffer("cos_sin", rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_base),
                             persistent=False)
        self._compiled: dict[str, object] = {}  # torch.compile of the pieces, made on first use

    @property
    def head_weight(self) -> torch.Tensor:
        """(vocab, h) weight of the output head: the embedding's when tied (the spec), else lm_head's."""
        return self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight

    # ---- the pieces of the forward pass -------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids) * self.emb_scale

    def initial_state(self, embedded: torch.Tensor, init_scale: float = 1.0,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.config.low_level_steps:
            return hrm.initial_state(self, embedded, init_scale, generator)
        return self.draw_state(embedded, init_scale, generator)

    def draw_state(self, embedded: torch.Tensor, init_scale: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
        std = self.state_std * init_scale
        state = torch.zeros_like(embedded)
        if std > 0:
            nn.init.trunc_normal_(state, 0.0, std, -3 * std, 3 * std, generator=generator)
            state = state * self.emb_scale
        return state

    def compiled(self, name: str, fn):
        """`fn`, or with model.compile its torch.compile (made once per piece, on first use).
        Only cache-free calls come here: nothing in them depends on the step number."""
        if not self.config.compile:
            return fn
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn)
        return self._compiled[name]

    def core_step(self, state: torch.Tensor, embedded: torch.Tensor, cos_sin: torch.Tensor,
                  cache: Optional[KVCache] = None, step: int = 0,
                  projected: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One recurrence: s <- core(adapter(concat([s, e]))) (or HRM's, pretrain/hrm.py).
        `projected`, the embedding's half of the adapter (`project_embedding(e)`), saves
        recomputing it when the caller runs many steps on one e."""
        if cache is None:  # without a cache the step number changes nothing: one graph for all
            return self.compiled("core_step", self._core_step)(state, embedded, cos_sin, None, 0, projected)
        return self._core_step(state, embedded, cos_sin, cache, step, projected)

    def _core_step(self, state: torch.Tensor, embedded: torch.Tensor, cos_sin: torch.Tensor,
                   cache: Optional[KVCache], step: int, projected: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.config.low_level_steps:
            return hrm.core_step(self, state, embedded, cos_sin, cache, step)
        if projected is None:
            projected = self.project_embedding(embedded)
        # adapter(concat([s, e])) = s W_s^T + e W_e^T, the second term fixed across iterations
        x = self.ops.injection_with_embedding(state, projected, self.transformer.adapter.weight)
        for block in self.transformer.core_block:
            x = block(x, cos_sin, cache, step)
        return x

    def project_embedding(self, embedded: torch.Tensor) -> Optional[torch.Tensor]:
        """e W_e^T (fp32), the embedding's half of the adapter, constant over the recurrence;
        None for HRM, whose injection mixes two changing states."""
        if self.config.low_level_steps:
            return None
        return self.ops.injection_embedding(embedded, self.transformer.adapter.weight)

    def iterate(self, state: torch.Tensor, embedded: torch.Tensor, cos_sin: torch.Tensor, n: int, k: int,
                cache: Optional[KVCache] = None) -> list[torch.Tensor]:
        """n core iterations without autograd, then k with it. Returns the state after each of
        the k grad iterations (the training objectives decode them), or [final state] if k = 0."""
        projected = self.project_embedding(embedded)  # with autograd: the grad iterations reach e through it
        with torch.no_grad():
            for step in range(n):
                state = self.core_step(state, embedded, cos_sin, cache, step, projected)
        states = [state] if k == 0 else []
        for step in range(n, n + k):
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                state = checkpoint(self.core_step, state, embedded, cos_sin, cache, step, projected,
                                   use_reentrant=False)
            else:
                state = self.core_step(state, embedded, cos_sin, cache, step, projected)
            states.append(state)
        return states

    def exit_logits(self, state: torch.Tensor) -> torch.Tensor:
        """The exit gate's logits (batch, seq) for a latent state; needs model.exit_gate."""
        if "exit_gate" not in self.transformer:
            raise ValueError("this model has no exit gate (it was trained without model.exit_gate=true)")
        return self.transformer.exit_gate(hrm.high_level(state, self.config.hidden_size))

    def encode(self, input_ids: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Embedding (scaled) and prelude: e."""
        if cache is None:
            return self.compiled("encode", self._encode)(input_ids, cos_sin, None)
        return self._encode(input_ids, cos_sin, cache)

    def _encode(self, input_ids: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
        embedded = self.embed(input_ids)
        for block in self.transformer.prelude:
            embedded = block(embedded, cos_sin, cache)
        return embedded

    def decode(self, state: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """ln_f, coda, ln_f again (the same norm module twice, as in the spec)."""
        if cache is None:
            return self.compiled("decode", self._decode)(state, cos_sin, None)
        return self._decode(state, cos_sin, cache)

    def _decode(self, state: torch.Tensor, cos_sin: torch.Tensor, cache: Optional[KVCache]) -> torch.Tensor:
        x = self.transformer.ln_f(hrm.high_level(state, self.config.hidden_size))
        for block in self.transformer.coda:
            x = block(x, cos_sin, cache)
        return self.transformer.ln_f(x)

    def resolve_steps(self, num_steps) -> tuple[int, int]:
        if num_steps is None:
            return self.config.mean_recurrence, 0
        if isinstance(num_steps, int):
            return num_steps, 0
        n, k = (int(v) for v in num_steps)
        if n < 0 or k < 0 or n + k < 1:
            raise ValueError(f"num_steps must give at least one core iteration, got {num_steps}")
        return n, k

    # ---- the one forward ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                num_steps=None, init_scale: float = 1.0, return_state: bool = False,
                return_logits: bool = True, cache: Optional[KVCache] = None, position_offset: int = 0,
                generator: Optional[torch.Generator] = None, objective=None) -> ModelOutput:
        """`objective` (pretrain.objectives.Objective) replaces the loss after the last
        iteration by a training objective over the grad iterations; it needs labels."""
        n, k = self.resolve_steps(num_steps)
        seq = input_ids.shape[1]
        if position_offset + seq > self.cos_sin.shape[0]:
            raise ValueError(f"positions up to {position_offset + seq} exceed model.max_seq_len={self.cos_sin.shape[0]}")
        cos_sin = self.cos_sin[position_offset:position_offset + seq]

        embedded = self.encode(input_ids, cos_sin, cache)
        state = self.initial_state(embedded, init_scale, generator)
        if objective is not None and labels is not None and not objective.plain:
            state, loss = objective(self, embedded, state, cos_sin, labels, n, k)
            return ModelOutput(logits=None, loss=loss, state=state if return_state else None, num_steps=(n, k))

        state = self.iterate(state, embedded, cos_sin, n, k, cache)[-1]
        x = self.decode(state, cos_sin, cache)
        logits = loss = None
        if labels is not None and not return_logits:
            # training: the kit may fuse the head into the loss (no full fp32 logits in memory)
            loss = self.kit.loss(x, self.head_weight, labels, self.ops)
        elif return_logits or labels is not None:
            logits = self.kit.head_logits(x, self.head_weight)
            if labels is not None:
                loss = self.kit.cross_entropy(logits, labels)
        return ModelOutput(logits=logits if return_logits else None, loss=loss,
                           state=state if return_state else None, num_steps=(n, k))

    # ---- bookkeeping ----------------------------------------------------------------------
    def flops_per_token(self, seq_len: int, causal_skip: bool = False) -> dict[str, int]:
        """Forward matmul FLOPs per token of each part; the core and adapter once (one iteration)."""
        t, cfg = self.transformer, self.config

        def blocks(group) -> int:
            return sum(block.flops_per_token(seq_len, causal_skip) for block in group)

        return {"prelude": blocks(t.prelude), "core": blocks(t.core_block),
                # per iteration the state's half of the adapter; the embedding's half runs once per
                # pass through the recurrence (project_embedding), except in HRM's injection
                "adapter": (2 if cfg.low_level_steps else 1) * 2 * cfg.hidden_size * cfg.hidden_size,
                "adapter_embedding": 0 if cfg.low_level_steps else 2 * cfg.hidden_size * cfg.hidden_size,
                "coda": blocks(t.coda),
                "head": 2 * cfg.hidden_size * cfg.vocab_size,
                "exit_gate": t.exit_gate.flops_per_token() if "exit_gate" in t else 0,
                "low_level": blocks(t.low_block) if "low_block" in t else 0, "low_level_steps": cfg.low_level_steps}

    def reset_parameters(self) -> None:
        """Re-draw every weight from the spec's init (norms to 1, q/k bias to 0)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, Attention) and module.qk_bias is not None:
                nn.init.zeros_(module.qk_bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: RecurrentDepthModel) -> dict[str, int]:
    """Parameters per part and materialised at depth r (the core counted r times)."""
    t = model.transformer
    parts = {
        "embedding": count_parameters(t.wte),
        "prelude": count_parameters(t.prelude),
        "adapter": count_parameters(t.adapter),
        "core": count_parameters(t.core_block),
        "coda": count_parameters(t.coda),
        "final_norm": count_parameters(t.ln_f),
    }
    if "exit_gate" in t:
        parts["exit_gate"] = count_parameters(t.exit_gate)
    if "low_block" in t:
        parts["low_level"] = count_parameters(t.low_block)
    if model.lm_head is not None:
        parts["head"] = count_parameters(model.lm_head)
    parts["total"] = count_parameters(model)
    return parts


def materialized_parameters(counts: dict[str, int], depth: int, low_level_steps: int = 0) -> int:
    """The core counted `depth` times (and an HRM low-level block depth x low_level_steps times)."""
    low = counts.get("low_level", 0)
    return counts["total"] - counts["core"] - low + depth * (counts["core"] + low_level_steps * low)


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor],
                          device: str | torch.device = "cpu") -> RecurrentDepthModel:
    """A single-device model holding exactly `state` (no random init is spent on it)."""
    model = build_model(cfg, device="meta")
    model.load_state_dict({name: t.to(device) for name, t in state.items()}, assign=True, strict=True)
    model.cos_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, device)
    return model


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", kit=None, seed: Optional[int] = None) -> RecurrentDepthModel:
    """Build on `device` ("meta" builds the shape only, without memory). With a `seed`, the
    weights are those every tensor-parallel layout starts from (pretrain/init_weights.py)."""
    if seed is None:
        with torch.device(device):
            return RecurrentDepthModel(cfg, kit)
    from rdp.pretrain.init_weights import initialize

    torch.manual_seed(seed)  # callers rely on a seeded global generator afterwards (e.g. the initial state)
    with torch.device("meta"):
        model = RecurrentDepthModel(cfg, kit)
    model.to_empty(device=device)
    initialize(model, seed)
    model.cos_sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, device)
    return model
