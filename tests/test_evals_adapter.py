"""The `rdp` lm-eval model on a tiny checkpoint, through lm-eval's real API: scores equal
the model's own log-probs, generation honours stop sequences and budgets, left-padded
batches, KV caches and adaptive exit agree with the plain forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from rdp.evals.lm_adapter import RecurrentDepthLM  # noqa: E402
from rdp.evals.testing import write_tiny_checkpoint  # noqa: E402

DEPTH = 3
PROMPTS = ["Question: Tom has 3 apples.", "Answer: 12", "Question: A box holds 6 pens. How many"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("evals_adapter") / "ckpt")


@pytest.fixture(scope="module")
def lm(checkpoint):
    return RecurrentDepthLM.create_from_arg_string(f"checkpoint={checkpoint},num_steps={DEPTH},init_scale=0",
                                                   {"batch_size": 3, "device": "cpu"})


def make(lm_obj, **kwargs):
    return RecurrentDepthLM(model=lm_obj.model, tokenizer=lm_obj.tok, **kwargs)


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def own_logprobs(lm_obj, ids: list[int], depth: int = DEPTH) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward."""
    with torch.no_grad():
        logits = lm_obj.model(torch.tensor([ids]), num_steps=depth, init_scale=0.0).logits[0]
    return F.log_softmax(logits[:-1].float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_is_sum_of_own_token_logprobs(lm):
    pairs = [(p, " 7 apples") for p in PROMPTS] + [("Answer:", " 12")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ids = lm.tok_encode(context + continuation)
        n_ctx = len(lm.tok_encode(context))
        lp = own_logprobs(lm, ids)
        assert logprob == pytest.approx(float(lp[n_ctx - 1:].sum()), abs=1e-4)
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids]), num_steps=DEPTH, init_scale=0.0).logits[0]
        assert greedy == bool((logits[n_ctx - 1:-1].argmax(-1) == torch.tensor(ids[n_ctx:])).all())


def test_rolling_loglikelihood_matches(lm):
    text = "Tom has 3 + 4 = 7 apples. Sam had 10 coins."
    (score,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = [lm.prefix_token_id] + lm.tok_encode(text, add_special_tokens=False)  # EOS: trained without BOS
    assert score == pytest.approx(float(own_logprobs(lm, ids).sum()), abs=1e-4)
    # several windows: every token still scored exactly once, each with up to max_length context
    short = make(lm, num_steps=DEPTH, max_length=8)
    (windowed,) = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert windowed != pytest.approx(score, abs=1e-3) and windowed < 0


def generate(lm_obj, prompts, **gen_kwargs):
    gen_kwargs.setdefault("until", [])
    return lm_obj.generate_until(requests("generate_until", [(p, dict(gen_kwargs)) for p in prompts]))


def test_generation_stops_at_stop_sequences_and_budget(lm):
    free = generate(lm, PROMPTS[:1], max_gen_toks=24)[0]
    assert len(lm.tok.encode(free)) <= 24 + 1
    stop = free[4:6]
    cut = generate(lm, PROMPTS[:1], max_gen_toks=24, until=[stop])[0]
    assert cut == free[:free.find(stop)]
    short = generate(lm, PROMPTS[:1], max_gen_toks=3)[0]
    assert free.startswith(short) and len(lm.tok.encode(short)) <= 4


def test_left_padded_batch_cached_equals_uncached_one_by_one(lm):
    batched = generate(lm, PROMPTS, max_gen_toks=12)  # batch_size 3, left padded, full KV cache
    reference = make(lm, num_steps=DEPTH, batch_size=1, cache="none")
    assert batched == [generate(reference, [p], max_gen_toks=12)[0] for p in PROMPTS]


def test_bounded_caches(lm):
    prompt = PROMPTS[2:]
    full1 = generate(make(lm, num_steps=1, batch_size=1, cache="full"), prompt, max_gen_toks=8)
    for cache in ("latest", "modulo"):  # at depth 1 there is only one step to keep
        assert generate(make(lm, num_steps=1, cache=cache, cache_slots=1), prompt, max_gen_toks=8) == full1
    full = generate(make(lm, num_steps=4, cache="full"), prompt, max_gen_toks=8)
    assert generate(make(lm, num_steps=4, cache="modulo", cache_slots=4), prompt, max_gen_toks=8) == full
    # memory of the bounded caches does not grow with depth
    from rdp.evals.cache import RecurrentKVCache

    sizes = {}
    for strategy, depth in [(s, d) for s in ("full", "latest", "modulo") for d in (2, 8)]:
        cache = RecurrentKVCache.for_model(lm.model, strategy, slots=2)
        with torch.no_grad():
            lm.model(torch.tensor([[1, 2, 3, 4]]), num_steps=depth, init_scale=0.0, cache=cache)
        sizes[strategy, depth] = cache.nbytes()
    assert sizes["full", 8] > sizes["full", 2]
    assert sizes["latest", 8] == sizes["latest", 2] and sizes["modulo", 8] == sizes["modulo", 2]


def test_sampling_is_seeded(lm):
    a = generate(make(lm, num_steps=2, seed=7), PROMPTS[:2], max_gen_toks=10, do_sample=True, temperature=1.0, top_k=20)
    b = generate(make(lm, num_steps=2, seed=7), PROMPTS[:2], max_gen_toks=10, do_sample=True, temperature=1.0, top_k=20)
    assert a == b


def test_adaptive_exit_threshold_zero_equals_fixed_depth(lm):
    pairs = [(p, " 7 apples") for p in PROMPTS]
    fixed = lm.loglikelihood(requests("loglikelihood", pairs))
    adaptive = make(lm, num_steps=DEPTH, exit_criterion="kl", exit_threshold=0)
    got = adaptive.loglikelihood(requests("loglikelihood", pairs))
    assert [g[0] for g in got] == pytest.approx([f[0] for f in fixed], abs=1e-4)
    assert adaptive.mean_steps() == DEPTH
    assert generate(adaptive, PROMPTS, max_gen_toks=8) == generate(lm, PROMPTS, max_gen_toks=8)


@pytest.mark.parametrize("criterion,threshold", [("kl", 1e-2), ("entropy-diff", 1e-2), ("latent-diff", 0.3),
                                                 ("argmax-stability", 1), ("cosine", 5e-2)])
def test_adaptive_exit_uses_fewer_steps(lm, criterion, threshold):
    cap = 8
    adaptive = make(lm, num_steps=cap, exit_criterion=criterion, exit_threshold=threshold)
    adaptive.loglikelihood(requests("loglikelihood", [(PROMPTS[2], " 7 apples and 12 pens")]))
    assert 2 <= adaptive.mean_steps() < cap
    assert all(1 <= s <= cap for s in adaptive.runner.steps_used)


def test_simple_evaluate_with_registered_name(checkpoint, tmp_path, monkeypatch):
    from rdp.evals.gsm8k import write_local_tasks
    from rdp.evals.testing import write_gsm8k_jsonl
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    names = write_local_tasks(write_gsm8k_jsonl(tmp_path / "gsm8k"), tmp_path / "tasks")
    out = lm_eval.simple_evaluate(model="rdp", model_args=f"checkpoint={checkpoint},num_steps=2",
                                  tasks=[names["gsm8k"]], num_fewshot=1, limit=2, gen_kwargs="max_gen_toks=6",
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    metrics = out["results"]["gsm8k_local"]
    assert metrics["sample_len"] == 2 if "sample_len" in metrics else True
    assert 0.0 <= metrics["exact_match,flexible-extract"] <= 1.0
