"""Scoring and generation at a chosen test-time depth, on the model's one forward.

Fixed depth runs batched: right padding for scoring (causal attention makes trailing pads
harmless), left padding with a masked KV cache for generation. Greedy fixed-depth
generation decodes speculatively (evals/speculative.py): the same tokens as the full-depth
forward, fewer core steps run one token at a time. Adaptive exit runs one
sequence at a time (the spec: batched adaptive runs flatter the results), driving the
model's public pieces (embed, prelude, initial_state, core_step, decode) token by token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rdp.evals.adaptive import ExitCriterion
from rdp.evals.cache import ProbeView, RecurrentKVCache
from rdp.evals.speculative import DraftStats, RecurrentDecoder, auto_draft_steps

CACHE_CHOICES = ("full", "latest", "modulo", "none")


@dataclass
class DepthSettings:
    num_steps: int = 32
    init_scale: float = 1.0
    cache: str = "full"  # full | latest | modulo | none (recompute the prefix every token)
    cache_slots: int = 4  # for cache=modulo
    exit_criterion: Optional[str] = None  # kl | entropy-diff | latent-diff | argmax-stability | cosine | learned
    exit_threshold: Optional[float] = None
    seed: int = 1234
    # warm-start each generated token's state from the previous token's final state
    # (huginn-0125's "continuous CoT"); changes the outputs, so off unless asked for
    continuous_compute: bool = False
    # speculative greedy decoding (never changes the tokens): self-drafts at this many core
    # steps (None = a quarter of num_steps, 0 = none), drafts looked up in the text so far,
    # at most draft_tokens tokens a round
    draft_steps: Optional[int] = None
    lookup_drafts: bool = True
    draft_tokens: int = 8

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.cache not in CACHE_CHOICES:
            raise ValueError(f"cache must be one of {CACHE_CHOICES}, got {self.cache!r}")
        if self.cache == "modulo" and self.cache_slots < 1:
            raise ValueError(f"cache=modulo needs cache_slots >= 1, got {self.cache_slots}")
        if self.exit_criterion in ("", "none"):
            self.exit_criterion = None
        if self.exit_criterion is not None:
            ExitCriterion(self.exit_criterion, self.exit_threshold)  # validates the name
        if self.draft_steps is not None and not 0 <= self.draft_steps < self.num_steps:
            raise ValueError(f"draft_steps must be in [0, num_steps={self.num_steps}), got {self.draft_steps}")
        if self.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {self.draft_tokens}")
        if self.continuous_compute and (self.exit_criterion is not None or self.cache == "none"):
            raise ValueError("continuous_compute needs fixed-depth generation with a KV cache "
                             "(no exit_criterion, cache != none)")

    def resolved_draft_steps(self) -> int:
        return auto_draft_steps(self.num_steps) if self.draft_steps is None else self.draft_steps

    def full_cache_layout(self) -> bool:
        """Whether the cache strategy keeps every (layer, step) entry, i.e. reproduces the
        uncached forward: full, modulo with a slot per step, anything at depth 1."""
        return (self.cache == "full" or self.num_steps == 1
                or (self.cache == "modulo" and self.cache_slots >= self.num_steps))


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class DepthRunner:
    def __init__(self, model, settings: DepthSettings, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None):
        self.model = model.eval()
        self.settings = settings
        self.device = next(model.parameters()).device
        cfg = model.config
        self.eos_token_id = cfg.eos_token_id if eos_token_id is None else eos_token_id
        self.pad_token_id = cfg.pad_token_id if pad_token_id is None else pad_token_id
        if self.pad_token_id is None:  # unset in the config: pads are masked or never read, any id will do
            self.pad_token_id = 0
        self.max_len = cfg.max_seq_len
        self.generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.steps_used: list[int] = []  # core steps spent on each token that was adaptive
        self.draft_stats = DraftStats()  # what self-speculative decoding drafted and kept
        if settings.exit_criterion == "learned" and "exit_gate" not in model.transformer:
            raise ValueError("--exit-criterion learned needs a model trained with an exit gate (model.exit_gate=true); "
                             "this checkpoint has none")

    @property
    def adaptive(self) -> bool:
        return self.settings.exit_criterion is not None

    def mean_steps(self) -> float:
        """Mean recurrence steps per predicted token (the fixed depth when not adaptive)."""
        if not self.adaptive:
            return float(self.settings.num_steps)
        return sum(self.steps_used) / len(self.steps_used) if self.steps_used else float("nan")

    # ---- forward helpers --------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, cache=None, offset: int = 0) -> torch.Tensor:
        out = self.model(ids, num_steps=(self.settings.num_steps, 0), init_scale=self.settings.init_scale,
                         cache=cache, position_offset=offset, generator=self.generator)
        return out.logits

    def _new_cache(self, pad_lengths: Optional[torch.Tensor] = None) -> RecurrentKVCache:
        strategy = "full" if self.settings.cache == "none" else self.settings.cache
        return RecurrentKVCache.for_model(self.model, strategy, self.settings.cache_slots, pad_lengths)

    def _adaptive_token(self, token: int, position: int, cache: RecurrentKVCache,
                        criterion: ExitCriterion) -> torch.Tensor:
        """Next-token logits (vocab,) for one token, iterating until the criterion says stop."""
        model = self.model
        ids = torch.tensor([[token]], device=self.device)
        cos_sin = model.cos_sin[position:position + 1]
        embedded = model.embed(ids)
        for block in model.transformer.prelude:
            embedded = block(embedded, cos_sin, cache)
        state = model.initial_state(embedded, self.settings.init_scale, self.generator)
        criterion.reset()
        probe = ProbeView(cache)
        steps = self.settings.num_steps
        for step in range(steps):
            state = model.core_step(state, embedded, cos_sin, cache, step)
            if step == steps - 1:
                break
            logits = exit_logit = None
            if criterion.needs_logits:
                logits = model.kit.head_logits(model.decode(state, cos_sin, probe), model.head_weight)[0, -1]
            if criterion.needs_gate:
                exit_logit = model.exit_logits(state)[0, -1]
            if criterion.update(state[0, -1], logits, exit_logit):
                break
        self.steps_used.append(step + 1)
        x = model.decode(state, cos_sin, cache)
        return model.kit.head_logits(x, model.head_weight)[0, -1]

    def _adaptive_logits(self, ids: list[int], adaptive_from: int) -> torch.Tensor:
        """Logits (len(ids), vocab) of one sequence; positions before `adaptive_from` run
        the full depth in one batched prefill, later ones exit adaptively."""
        cache = self._new_cache()
        criterion = ExitCriterion(self.settings.exit_criterion, self.settings.exit_threshold)
        rows = []
        if adaptive_from > 0:
            rows.append(self._forward(torch.tensor([ids[:adaptive_from]], device=self.device), cache)[0])
        for position in range(adaptive_from, len(ids)):
            rows.append(self._adaptive_token(ids[position], position, cache, criterion)[None])
        return torch.cat(rows)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def continuation_logprobs(self, inputs: list[list[int]], targets: list[list[int]]):
        """For each row: log-probs of `targets` predicted at the last len(target) positions of
        `inputs`, and whether each target token is the argmax. Rows run as one batch."""
        if self.adaptive:
            results = []
            for ids, target in zip(inputs, targets):
                logits = self._adaptive_logits(ids, len(ids) - len(target))
                results.append(self._pick(logits[len(ids) - len(target):], target))
            return results
        width = max(len(ids) for ids in inputs)
        batch = torch.full((len(inputs), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids, device=self.device)
        logits = self._forward(batch)
        results = []
        for row, (ids, target) in enumerate(zip(inputs, targets)):
            results.append(self._pick(logits[row, len(ids) - len(target):len(ids)], target))
        return results

    def _pick(self, logits: torch.Tensor, target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logp = F.log_softmax(logits.float(), dim=-1)
        target_t = torch.tensor(target, device=logp.device)
        return logp.gather(-1, target_t[:, None])[:, 0].cpu(), (logp.argmax(-1) == target_t).cpu()

    # ---- generation ---------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """logits (batch, vocab) -> next tokens (batch,)."""
        if params.greedy:
            return logits.argmax(-1)
        logits = logits.float() / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the token crossing top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[:, 0]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 should_stop: Optional[Callable[[int, list[int]], bool]] = None) -> list[list[int]]:
        """New tokens for each prompt, stopping a row at EOS, at `should_stop(row, tokens)`
        or after params.max_new_tokens."""
        budget = [min(params.max_new_tokens, self.max_len - len(p)) for p in prompts]
        for row, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {row} is empty; give at least one token (e.g. BOS)")
            if budget[row] < 0:
                raise ValueError(f"prompt {row} has {len(prompt)} tokens, more than model.max_seq_len={self.max_len}")
        if self.adaptive or self.settings.cache == "none":
            return [self._generate_one(row, p, params, budget[row], should_stop) for row, p in enumerate(prompts)]
        return RecurrentDecoder(self, self.can_speculate(params), self.draft_stats).generate(
            prompts, params, budget, should_stop)

    def can_speculate(self, params: SamplingParams) -> bool:
        """Speculation returns exactly the sequential tokens only for greedy choices of a
        deterministic forward (no random initial state, no state carried between tokens)
        whose cache keeps every step (a shallower draft must read exact step-s entries)."""
        s = self.settings
        return (params.greedy and s.init_scale == 0 and not s.continuous_compute
                and s.full_cache_layout() and (s.resolved_draft_steps() > 0 or s.lookup_drafts))

    def _finished(self, row: int, tokens: list[int], budget: int, should_stop) -> bool:
        if len(tokens) >= budget:
            return True
        if tokens and tokens[-1] == self.eos_token_id:
            return True
        return bool(tokens) and should_stop is not None and should_stop(row, tokens)

    def _generate_batch(self, prompts, params, budget, should_stop) -> list[list[int]]:
        """One token at a time through the model's forward with a RecurrentKVCache (the
        cached path before speculative decoding; kept for benchmarks/bench_generation.py)."""
        width = max(len(p) for p in prompts)
        pads = torch.tensor([width - len(p) for p in prompts], device=self.device)
        batch = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            batch[row, width - len(prompt):] = torch.tensor(prompt, device=self.device)
        cache = self._new_cache(pads)
        logits = self._forward(batch, cache)[:, -1]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [self._finished(r, [], budget[r], should_stop) for r in range(len(prompts))]
        position = width
        while not all(done):
            tokens = self._choose(logits, params)
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = self._finished(row, outputs[row], budget[row], should_stop)
            if all(done) or position >= self.max_len:
                break
            logits = self._forward(tokens[:, None], cache, offset=position)[:, -1]
            position += 1
        return outputs

    def _generate_one(self, row: int, prompt: list[int], params, budget: int, should_stop) -> list[int]:
        output: list[int] = []
        if self._finished(row, output, budget, should_stop):
            return output
        if self.settings.cache == "none" and not self.adaptive:
            while True:  # the reference: the whole sequence through the model for every token
                ids = torch.tensor([prompt + output], device=self.device)
                output.append(int(self._choose(self._forward(ids)[:, -1], params)[0]))
                if self._finished(row, output, budget, should_stop):
                    return output
        cache = self._new_cache()
        criterion = ExitCriterion(self.settings.exit_criterion, self.settings.exit_threshold)
        if len(prompt) > 1:
            self._forward(torch.tensor([prompt[:-1]], device=self.device), cache)
        token, position = prompt[-1], len(prompt) - 1
        while True:
            logits = self._adaptive_token(token, position, cache, criterion)
            token = int(self._choose(logits[None], params)[0])
            output.append(token)
            position += 1
            if self._finished(row, output, budget, should_stop):
                return output
