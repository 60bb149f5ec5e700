"""Fixed-depth generation with a KV cache, and speculative greedy decoding that returns
exactly the full-depth greedy tokens.

Self-speculation, and why its draft is nearly free in a recurrent-depth model: the first d
core steps of a depth-n forward are exactly a depth-d forward (same prelude output, same
initial state, and step s only attends to step-s keys/values). So each token runs its
prelude and first d core steps once, one token at a time, and decodes that depth-d state to
draft the next token; then all drafted tokens continue together from step d to step n in
one forward, which checks them. Nothing before step d is computed twice, and the full-depth
entries of every accepted token are already in the cache.

One round, with x the last accepted token (chosen, not yet run) at position p:

    for j = 0..k:   token t_j (t_0 = x) at position p + j: prelude, core steps 0..d-1,
                    keep (embedding, state); for j < k decode the state -> draft t_{j+1}
    verify:         positions p..p+k together: core steps d..n-1, coda, head -> z_0..z_k
    accept:         the longest prefix with t_{j+1} == z_j, plus the verifier's next token

Lookup drafts cost nothing to make: when the text's last few tokens occurred before, the
tokens that followed them then are the draft (prompt-lookup decoding; repeats are common in
few-shot prompts, code and chains of thought). All k+1 tokens are then known up front and
run the whole depth together (d = 0 in the scheme above), so a wrong lookup costs about what
a plain token costs.

Either way a round yields between 1 and k+1 tokens, each the argmax of the full-depth logits
at its position; with k = 0 it is plain one-token-at-a-time decoding. In a batch every row
advances by the shortest accepted prefix among unfinished rows (all of them full-depth
tokens for every row). The draft's coda reads the full-depth coda entries of accepted
tokens; the verify overwrites the draft's entries.

The blocks run through evals/decode_blocks.py where it applies (same arithmetic, fewer
tensor operations: what a small model's tokens cost on a CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rdp.evals.cache import RecurrentKVCache, StepKVCache
from rdp.evals.decode_blocks import LeanBlocks


@dataclass
class DraftStats:
    """What speculation did during one runner's generations (for benchmarks and reports)."""
    rounds: int = 0  # rounds with self-drafted tokens
    drafted: int = 0
    accepted: int = 0
    lookup_rounds: int = 0  # rounds with lookup drafts
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    def record(self, lookup: bool, drafted: int, accepted: int) -> None:
        if lookup:
            self.lookup_rounds, self.lookup_drafted = self.lookup_rounds + 1, self.lookup_drafted + drafted
            self.lookup_accepted += accepted
        else:
            self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + drafted, self.accepted + accepted

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def lookup_acceptance(self) -> float:
        return self.lookup_accepted / self.lookup_drafted if self.lookup_drafted else float("nan")


class DraftLength:
    """How many tokens to draft next round.

    While drafting pays, the length grows by two after a fully accepted draft and otherwise
    drops to one more than was accepted (within [1, most]). Drafting pays while the recent
    acceptance rate (decaying average over roughly the last ten rounds) is at least
    `break_even`, the share of a plain token's cost that drafting one token adds. Below it
    the decoder runs plain rounds (no draft) and probes again after 4, 8, ... 64 rounds, so a
    model whose shallow drafts rarely agree loses at most a few percent. The policy depends
    only on what was accepted: the same input always takes the same path.
    """

    DECAY = 0.9
    FIRST_PAUSE, LONGEST_PAUSE = 4, 64

    def __init__(self, most: int, break_even: float, start: int = 2):
        self.most, self.break_even = most, break_even
        self.length = min(start, most)
        self.hits = self.trials = 0.0
        self.wait, self.pause = 0, self.FIRST_PAUSE

    @property
    def estimate(self) -> float:
        return self.hits / self.trials if self.trials else 1.0

    def next(self) -> int:
        return 0 if self.wait > 0 else self.length

    def update(self, drafted: int, accepted: int) -> None:
        self.hits *= self.DECAY
        self.trials *= self.DECAY
        if drafted == 0:
            self.wait = max(0, self.wait - 1)
            return
        self.hits += accepted
        self.trials += accepted + (accepted < drafted)  # the first rejection is a trial too
        if accepted == drafted:
            self.length = min(self.most, self.length + 2)
        else:
            self.length = max(1, min(self.most, accepted + 1))
        if self.estimate < self.break_even:
            self.wait, self.pause = self.pause, min(self.LONGEST_PAUSE, 2 * self.pause)
        else:
            self.pause = self.FIRST_PAUSE


def break_even(config, num_steps: int, draft_steps: int) -> float:
    """Acceptance rate above which self-drafting one token is worth its cost, counting block
    calls per token (the head as one more, an HRM core's low-level updates included):
    drafting adds a token's prelude, draft steps, coda and head, which must be repaid by the
    plain token it saves."""
    prelude, coda = config.prelude_layers, config.coda_layers
    core = config.core_layers + getattr(config, "low_level_steps", 0) * getattr(config, "low_level_layers", 0)
    return (prelude + core * draft_steps + coda + 1) / (prelude + core * num_steps + coda + 1)


LOOKUP_BREAK_EVEN = 0.1  # a lookup draft only adds query positions to a forward that runs anyway
LOOKUP_NGRAMS = (3, 2)  # match the last 3 tokens, else the last 2


def lookup(context: list[int], most: int) -> list[int]:
    """Up to `most` tokens that followed the latest earlier occurrence of the context's last
    3 (else 2) tokens; [] when they never occurred before."""
    last = len(context) - 1
    for size in LOOKUP_NGRAMS:
        if last < size:
            continue
        tail = context[-size:]
        for end in range(last - 1, size - 2, -1):  # end: last index of an earlier occurrence
            if context[end] == tail[-1] and context[end - size + 1:end + 1] == tail:
                return context[end + 1:end + 1 + most]
    return []


def auto_draft_steps(num_steps: int) -> int:
    """Default draft depth: a quarter of the full depth, at least one step."""
    return max(1, num_steps // 4) if num_steps > 1 else 0


class RecurrentDecoder:
    """Generates for one `DepthRunner` (its model, settings, sampling and stop rules)."""

    def __init__(self, runner, speculate: bool, stats: Optional[DraftStats] = None):
        self.runner = runner
        self.model = runner.model
        settings = runner.settings
        self.num_steps = settings.num_steps
        self.draft_steps = settings.resolved_draft_steps() if speculate else 0
        self.continuous = settings.continuous_compute
        self.init_scale = settings.init_scale
        self.stats = stats if stats is not None else DraftStats()
        most = settings.draft_tokens
        self.self_drafts = DraftLength(most, break_even(self.model.config, self.num_steps, self.draft_steps)) \
            if speculate and self.draft_steps > 0 else None
        self.lookups = DraftLength(most, LOOKUP_BREAK_EVEN) if speculate and settings.lookup_drafts else None
        lean = LeanBlocks(self.model)
        self.lean = lean if lean.applies else None

    # ---- the model's pieces (evals/decode_blocks.py where it applies, else the modules) --------
    def _at(self, position: int, length: int):
        """What the pieces need to know about positions [position, position + length)."""
        if self.lean is not None:
            return self.lean.rope(position, length)
        return self.model.cos_sin[position:position + length]

    def _prelude(self, ids: torch.Tensor, at, cache) -> torch.Tensor:
        if self.lean is not None:
            return self.lean.prelude(ids, at, cache)
        embedded = self.model.embed(ids)
        for block in self.model.transformer.prelude:
            embedded = block(embedded, at, cache)
        return embedded

    def _core(self, state, embedded, at, cache, steps: range) -> torch.Tensor:
        step_fn = self.model.core_step if self.lean is None else self.lean.core_step
        for step in steps:
            state = step_fn(state, embedded, at, cache, step)
        return state

    def _logits(self, state, at, cache, last_only: bool) -> torch.Tensor:
        x = self.model.decode(state, at, cache) if self.lean is None else self.lean.decode(state, at, cache)
        if last_only:  # the prompt's other positions need coda entries, not logits
            x = x[:, -1:]
        return self.model.kit.head_logits(x, self.model.head_weight)

    def _start_state(self, embedded: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor:
        if carried is not None:  # continuous compute: the previous token's final state
            return carried
        return self.model.initial_state(embedded, self.init_scale, self.runner.generator)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params, budget: list[int],
                 should_stop: Optional[Callable[[int, list[int]], bool]]) -> list[list[int]]:
        runner, model = self.runner, self.model
        device, max_len = runner.device, runner.max_len
        width = max(len(p) for p in prompts)
        pads = torch.tensor([width - len(p) for p in prompts], device=device)
        batch = torch.full((len(prompts), width), runner.pad_token_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            batch[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        cache = self._new_cache(pads, min(max_len, width + max(budget)))

        outputs: list[list[int]] = [[] for _ in prompts]
        done = [runner._finished(r, [], budget[r], should_stop) for r in range(len(prompts))]
        if all(done):
            return outputs
        # prefill: the whole prompt at full depth
        at = self._at(0, width)
        embedded = self._prelude(batch, at, cache)
        state = self._core(model.initial_state(embedded, self.init_scale, runner.generator), embedded,
                           at, cache, range(self.num_steps))
        pending = runner._choose(self._logits(state, at, cache, last_only=True)[:, -1], params)
        carried = state[:, -1:] if self.continuous else None
        self._append(outputs, done, pending[:, None].tolist(), budget, should_stop)
        position = width  # where `pending` goes

        while not all(done) and position < max_len:
            remaining = max(budget[r] - len(outputs[r]) for r in range(len(prompts)) if not done[r])
            most = min(remaining - 1, max_len - 1 - position)  # never past the budget or max_seq_len
            proposed = self._lookup(prompts, outputs, done, pending, most)
            if proposed is not None:
                embedded, states, drafts, first = self._lookup_round(pending, proposed, position, cache)
            else:
                k = min(self.self_drafts.next(), most) if self.self_drafts else 0
                embedded, states, drafts = self._draft(pending, position, k, cache, carried)
                first = self.draft_steps
            # verify: all k+1 tokens from step `first` to the full depth in one forward
            k = 0 if drafts is None else drafts.shape[1]
            cache.position = position
            at = self._at(position, k + 1)
            state = self._core(states, embedded, at, cache, range(first, self.num_steps))
            logits = self._logits(state, at, cache, last_only=k == 0)
            if k == 0:
                chosen = runner._choose(logits[:, -1], params)[:, None]
                accepted = 0
            else:
                chosen = logits.argmax(-1)  # (batch, k + 1): the full-depth greedy tokens
                agree = (chosen[:, :k] == drafts).long().cumprod(-1).sum(-1).tolist()
                accepted = min(a for a, d in zip(agree, done) if not d)
                chosen = chosen[:, :accepted + 1]
                self.stats.record(proposed is not None, k, accepted)
            for policy, used in ((self.self_drafts, proposed is None), (self.lookups, proposed is not None)):
                if policy is not None:
                    policy.update(k if used else 0, accepted if used else 0)
            self._append(outputs, done, chosen.tolist(), budget, should_stop)
            pending = chosen[:, -1]
            carried = state[:, accepted:accepted + 1] if self.continuous else None
            position += accepted + 1
        return outputs

    def _draft(self, pending: torch.Tensor, position: int, k: int, cache, carried):
        """Prelude and the first draft_steps core steps of `pending` and k drafted tokens, one
        at a time; returns their embeddings and states (batch, k+1, h) and the drafts (batch, k)."""
        token = pending[:, None]
        embedded, states, drafts = [], [], []
        for j in range(k + 1):
            cache.position = position + j
            at = self._at(position + j, 1)
            e = self._prelude(token, at, cache)
            s = self._core(self._start_state(e, carried), e, at, cache, range(self.draft_steps))
            embedded.append(e)
            states.append(s)
            if j < k:
                token = self._logits(s, at, cache, last_only=True)[:, -1].argmax(-1)[:, None]
                drafts.append(token)
        if k == 0:
            return embedded[0], states[0], None
        return torch.cat(embedded, 1), torch.cat(states, 1), torch.cat(drafts, 1)

    def _lookup(self, prompts, outputs, done, pending: torch.Tensor, most: int) -> Optional[torch.Tensor]:
        """Lookup drafts (batch, k) when every unfinished row has one, else None."""
        most = min(most, self.lookups.next()) if self.lookups else 0
        if most <= 0:
            return None
        found = [None if done[r] else lookup(prompts[r] + outputs[r], most) for r in range(len(prompts))]
        lengths = [len(f) for f in found if f is not None]
        if min(lengths) == 0:
            return None
        k = min(lengths)
        fill = pending.tolist()  # finished rows run their last token again; nothing reads it
        rows = [f[:k] if f is not None else [fill[r]] * k for r, f in enumerate(found)]
        return torch.tensor(rows, device=pending.device)

    def _lookup_round(self, pending: torch.Tensor, proposed: torch.Tensor, position: int, cache):
        tokens = torch.cat([pending[:, None], proposed], 1)
        cache.position = position
        at = self._at(position, tokens.shape[1])
        embedded = self._prelude(tokens, at, cache)
        return embedded, self.model.initial_state(embedded, self.init_scale, self.runner.generator), proposed, 0

    def _new_cache(self, pads: torch.Tensor, capacity: int):
        settings = self.runner.settings
        if settings.full_cache_layout():
            return StepKVCache(capacity, pads)
        return RecurrentKVCache.for_model(self.model, settings.cache, settings.cache_slots, pads)

    def _append(self, outputs, done, rows: list[list[int]], budget, should_stop) -> None:
        """Append each row's new tokens one by one, stopping a row where the reference would."""
        for row, tokens in enumerate(rows):
            for token in tokens:
                if done[row]:
                    break
                outputs[row].append(token)
                done[row] = self.runner._finished(row, outputs[row], budget[row], should_stop)
