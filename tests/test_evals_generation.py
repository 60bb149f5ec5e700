"""Generation that is fast and exact: self-speculative greedy decoding returns token for
token what the uncached full-depth forward returns (cache=none, one sequence at a time),
across depths, draft depths, prompt lengths, left-padded batches, EOS, stop rules and
budgets; the new cached path equals the previous one where it does not speculate; and
continuous compute warm-starts each token from the previous token's final state."""
from __future__ import annotations

import pytest
import torch

from rdp.evals.cache import RecurrentKVCache, StepKVCache
from rdp.evals.decode_blocks import LeanBlocks
from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams
from rdp.evals.speculative import DraftLength, lookup
from rdp.pretrain.config import load_config
from rdp.pretrain.model import build_model

PROMPTS = [[(7 * i + 3 * j + j * j) % 100 for j in range(3 + 5 * i)] for i in range(4)]  # 3, 8, 13, 18 tokens


def tiny_model(state_weight: float = 1.0):
    """The tiny preset, random init; `state_weight` < 1 shrinks the state's half of the
    adapter so the recurrence converges quickly and shallow drafts often agree (like a
    trained model), exercising long accepted drafts as well as rejections."""
    model = build_model(load_config("tiny").model, seed=0).eval()
    hidden = model.config.hidden_size
    with torch.no_grad():
        model.transformer.adapter.weight[:, :hidden] *= state_weight
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine waiting for it costs 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converging():
    return tiny_model(0.3)


def runner(model, eos=-1, **settings) -> DepthRunner:
    settings.setdefault("init_scale", 0.0)
    return DepthRunner(model, DepthSettings(**settings), eos_token_id=eos)


def reference(model, prompts, depth, max_new, eos=-1, should_stop=None):
    """The uncached full-depth forward over the whole sequence for every token, one row at a time."""
    ref = runner(model, eos, num_steps=depth, cache="none")
    params = SamplingParams(max_new_tokens=max_new)
    rows = []
    for row, prompt in enumerate(prompts):
        stop = None if should_stop is None else (lambda _, tokens, row=row: should_stop(row, tokens))
        rows.append(ref.generate([prompt], params, stop)[0])
    return rows


@pytest.mark.parametrize("depth,draft_steps,lookups", [(2, 1, False), (4, 1, True), (4, 2, False), (6, 3, True)])
def test_speculative_greedy_equals_uncached_full_depth(converging, depth, draft_steps, lookups):
    expected = reference(converging, PROMPTS, depth, 20)
    spec = runner(converging, num_steps=depth, draft_steps=draft_steps, lookup_drafts=lookups)
    params = SamplingParams(max_new_tokens=20)
    assert [spec.generate([p], params)[0] for p in PROMPTS] == expected
    assert spec.generate(PROMPTS, params) == expected  # one left-padded batch
    assert spec.generate(PROMPTS[2:], params) == expected[2:]
    stats = spec.draft_stats  # drafts were both kept and thrown away, so both paths ran
    assert stats.accepted > 0 and stats.accepted < stats.drafted


def test_speculation_pauses_when_drafts_disagree_and_lookups_catch_repeats():
    model = tiny_model()  # plain random init: depth-1 drafts of depth 4 seldom agree, outputs loop
    expected = reference(model, PROMPTS, 4, 24)
    spec = runner(model, num_steps=4, draft_steps=1, lookup_drafts=False)
    assert spec.generate(PROMPTS, SamplingParams(max_new_tokens=24)) == expected
    # drafting stopped after the first misses: far fewer drafted tokens than generated ones
    assert spec.draft_stats.drafted < 10
    lookups = runner(model, num_steps=4, draft_steps=0)
    assert [lookups.generate([p], SamplingParams(max_new_tokens=24))[0] for p in PROMPTS] == expected
    stats = lookups.draft_stats
    assert stats.rounds == 0 and 0 < stats.lookup_accepted < stats.lookup_drafted


def test_lookup_finds_the_latest_earlier_occurrence():
    assert lookup([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], most=4) == [7, 8, 1, 2]  # 3-gram, the latest
    assert lookup([1, 2, 6, 0, 4, 2, 6], most=3) == [0, 4, 2]  # else the last 2 tokens
    assert lookup([4, 4, 4], most=5) == [4]
    assert lookup([1, 2, 3, 4], most=3) == [] and lookup([7], most=3) == []


def test_hrm_core_speculates_exactly():
    """The two-timescale core keeps the property speculation needs (step s reads step-s entries)."""
    model = build_model(load_config("tiny", ["model.low_level_steps=2"]).model, seed=0).eval()
    spec = runner(model, num_steps=4, draft_steps=2)
    assert spec.generate(PROMPTS, SamplingParams(max_new_tokens=12)) == reference(model, PROMPTS, 4, 12)
    assert spec.draft_stats.drafted + spec.draft_stats.lookup_drafted > 0


def test_eos_stop_rule_and_budget_cut_exactly_where_the_reference_does(converging):
    depth, free = 4, reference(converging, PROMPTS, 4, 20)
    eos = free[1][6]  # a token row 1 emits mid-way (other rows may emit it elsewhere, or never)
    spec = runner(converging, eos=eos, num_steps=depth, draft_steps=2)
    with_eos = spec.generate(PROMPTS, SamplingParams(max_new_tokens=20))
    assert with_eos == reference(converging, PROMPTS, depth, 20, eos=eos)
    assert with_eos[1][-1] == eos and len(with_eos[1]) <= 7

    def stop_after_pair(row, tokens):  # a stop rule that looks at the text so far
        return tokens[-2:] == free[row][4:6]

    stopped = spec.generate(PROMPTS, SamplingParams(max_new_tokens=20), stop_after_pair)
    assert stopped == reference(converging, PROMPTS, depth, 20, eos=eos, should_stop=stop_after_pair)
    assert spec.generate(PROMPTS, SamplingParams(max_new_tokens=3)) == reference(converging, PROMPTS, depth, 3, eos=eos)
    assert spec.generate(PROMPTS, SamplingParams(max_new_tokens=0)) == [[], [], [], []]


def test_generation_runs_up_to_max_seq_len(converging):
    max_len = converging.config.max_seq_len
    prompt = [(5 * j) % 100 for j in range(max_len - 6)]
    spec = runner(converging, num_steps=4, draft_steps=2)
    out = spec.generate([prompt], SamplingParams(max_new_tokens=50))
    assert len(out[0]) == 6 and out == reference(converging, [prompt], 4, 50)


@pytest.mark.parametrize("cache,slots,depth", [("modulo", 4, 4), ("latest", 1, 1), ("modulo", 1, 1)])
def test_strategies_that_keep_every_step_are_exact_too(converging, cache, slots, depth):
    spec = runner(converging, num_steps=depth, cache=cache, cache_slots=slots)
    assert spec.settings.full_cache_layout()
    assert spec.generate(PROMPTS, SamplingParams(max_new_tokens=12)) == reference(converging, PROMPTS, depth, 12)


@pytest.mark.parametrize("cache,slots", [("latest", 1), ("modulo", 2)])
def test_bounded_caches_and_sampling_match_the_previous_cached_path(cache, slots):
    """Where speculation does not apply (a bounded cache, sampling with a random initial
    state) the new decoder does exactly what the previous one-token-at-a-time path did."""
    model = tiny_model()
    for init_scale, params in [(0.0, SamplingParams(max_new_tokens=10)),
                               (1.0, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20))]:
        settings = dict(num_steps=4, cache=cache, cache_slots=slots, init_scale=init_scale, seed=5)
        new = runner(model, **settings).generate(PROMPTS, params)
        budget = [params.max_new_tokens] * len(PROMPTS)
        assert new == runner(model, **settings)._generate_batch(PROMPTS, params, budget, None)
    full = dict(num_steps=4, init_scale=1.0, seed=5)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    assert not runner(model, **full).can_speculate(sampled)
    assert (runner(model, **full).generate(PROMPTS, sampled)
            == runner(model, **full)._generate_batch(PROMPTS, sampled, [10] * len(PROMPTS), None))


def continuous_reference(model, prompt, depth, max_new):
    """Warm-started generation spelled out with the model's pieces and the original cache."""
    cache = RecurrentKVCache.for_model(model, "full")
    out = model(torch.tensor([prompt]), num_steps=depth, init_scale=0.0, cache=cache, return_state=True)
    tokens, state = [int(out.logits[0, -1].argmax())], out.state[:, -1:]
    while len(tokens) < max_new:
        position = len(prompt) + len(tokens) - 1
        cos_sin = model.cos_sin[position:position + 1]
        embedded = model.embed(torch.tensor([[tokens[-1]]]))
        for block in model.transformer.prelude:
            embedded = block(embedded, cos_sin, cache)
        for step in range(depth):
            state = model.core_step(state, embedded, cos_sin, cache, step)
        x = model.decode(state, cos_sin, cache)
        tokens.append(int(model.kit.head_logits(x, model.transformer.wte.weight)[0, -1].argmax()))
    return tokens


@torch.no_grad()
def test_continuous_compute_warm_starts_from_the_previous_token():
    model = tiny_model()
    warm = runner(model, num_steps=4, continuous_compute=True)
    params = SamplingParams(max_new_tokens=12)
    out = warm.generate(PROMPTS, params)
    assert out == [continuous_reference(model, p, 4, 12) for p in PROMPTS]
    assert out == [warm.generate([p], params)[0] for p in PROMPTS]  # left padding changes nothing
    plain = runner(model, num_steps=4).generate(PROMPTS, params)
    assert [o[0] for o in out] == [p[0] for p in plain]  # the first token comes from the prompt alone
    assert out != plain and warm.draft_stats.drafted == 0  # it changes outputs; no speculation
    bounded = runner(model, num_steps=4, continuous_compute=True, cache="latest").generate(PROMPTS, params)
    assert len(bounded) == 4 and all(len(o) == 12 for o in bounded)
    with pytest.raises(ValueError, match="continuous_compute"):
        DepthSettings(num_steps=4, continuous_compute=True, exit_criterion="kl")
    with pytest.raises(ValueError, match="continuous_compute"):
        DepthSettings(num_steps=4, continuous_compute=True, cache="none")
    with pytest.raises(ValueError, match="draft_steps"):
        DepthSettings(num_steps=4, draft_steps=4)


def test_draft_length_policy():
    policy = DraftLength(most=6, break_even=0.4)
    assert policy.next() == 2
    policy.update(2, 2)
    assert policy.next() == 4  # a fully accepted draft grows by two
    policy.update(4, 1)
    assert policy.next() == 2  # otherwise one more than was accepted
    misses = 0
    while policy.next() > 0:
        policy.update(policy.next(), 0)
        misses += 1
    assert misses == 3 and policy.estimate < 0.4  # drafting stopped paying: plain rounds
    pauses = []
    for _ in range(3):
        waited = 0
        while policy.next() == 0:
            policy.update(0, 0)
            waited += 1
        pauses.append(waited)
        policy.update(policy.next(), 0)  # the probe misses too
    assert pauses == [4, 8, 16]


@torch.no_grad()
def test_lean_blocks_are_bit_identical_to_the_model_pieces():
    """The decoder's lean block forward (evals/decode_blocks.py) computes what the model's
    modules compute, bit for bit: prefill, one-token and few-token forwards on one cache."""
    model = tiny_model()
    lean = LeanBlocks(model)
    assert lean.applies
    caches = StepKVCache(40), StepKVCache(40)
    torch.manual_seed(0)
    for start, length in [(0, 17), (17, 1), (18, 5)]:
        ids = torch.randint(0, 100, (2, length))
        state = torch.randn(2, length, model.config.hidden_size)
        cos_sin, rope = model.cos_sin[start:start + length], lean.rope(start, length)
        for cache in caches:
            cache.position = start
        e = model.encode(ids, cos_sin, caches[0])
        assert torch.equal(lean.prelude(ids, rope, caches[1]), e)
        for step in range(3):
            s = model.core_step(state, e, cos_sin, caches[0], step)
            assert torch.equal(lean.core_step(state, e, rope, caches[1], step), s)
            state = s
        assert torch.equal(lean.decode(state, rope, caches[1]), model.decode(state, cos_sin, caches[0]))
    assert not LeanBlocks(tiny_model().to(torch.bfloat16)).applies  # other dtypes run the modules
    assert not LeanBlocks(build_model(load_config("tiny", ["model.low_level_steps=2"]).model, seed=0)).applies


def test_step_cache_overwrites_in_place_and_names_its_capacity():
    cache = StepKVCache(capacity=4)
    key = lambda value, n: torch.full((1, 1, n, 2), float(value))  # noqa: E731
    cache.update((1, 0), key(1, 3), key(1, 3))
    cache.position = 1  # a rejected draft from position 1 on is overwritten
    k, _ = cache.update((1, 0), key(2, 2), key(2, 2))
    assert k[0, 0, :, 0].tolist() == [1.0, 2.0, 2.0]
    assert cache.attention_mask(2, 3)[0, 0].tolist() == [[0.0, 0.0, float("-inf")], [0.0, 0.0, 0.0]]
    cache.position = 3
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update((1, 0), key(3, 2), key(3, 2))


def test_continuous_compute_reaches_adapter_sweep_and_cli(tmp_path, capsys):
    from rdp.evals.lm_adapter import RecurrentDepthLM
    from rdp.evals.sweep import Sweep, SweepConfig
    from rdp.evals.testing import write_tiny_checkpoint
    from rdp.launch.cli import main as rdp

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    lm = RecurrentDepthLM.create_from_arg_string(
        f"checkpoint={ckpt},num_steps=2,continuous_compute=true,draft_steps=1,lookup_drafts=false", {})
    assert lm.settings.continuous_compute and lm.settings.draft_steps == 1 and not lm.settings.lookup_drafts
    with pytest.raises(ValueError, match="continuous_compute must be true or false"):
        RecurrentDepthLM(model=lm.model, tokenizer=lm.tok, continuous_compute="maybe")
    cfg = SweepConfig(checkpoint=str(ckpt), tasks=["parity"], depths=[2], out_dir=str(tmp_path / "out"),
                      continuous_compute=True)
    assert cfg.identity()["continuous_compute"] is True  # results record it; a resume must match it
    assert Sweep(cfg, progress=False).lm(2).settings.continuous_compute
    argv = ["eval", str(ckpt), "--tasks", "parity", "--depths", "2", "--out", str(tmp_path / "bad"), "--no-progress",
            "--continuous-compute", "--exit-criterion", "kl"]
    assert rdp(argv) == 2 and "continuous_compute" in capsys.readouterr().err
