"""The lm-evaluation-harness model `rdp`: any checkpoint this project writes or imports,
evaluated at a chosen test-time depth, optionally with per-token adaptive exit.

    lm_eval --model rdp --model_args checkpoint=runs/x,num_steps=16 --tasks ...   (evals/lm_eval_plugin.py)
    python -m rdp.evals.harness --model rdp --model_args checkpoint=runs/x,num_steps=16 --tasks ...
    lm_eval.simple_evaluate(model="rdp", model_args="checkpoint=runs/x,num_steps=16", tasks=[...])

Prompts are framed as the checkpoint's training framed documents (BOS first or not, see
evals/tokenizer.py); chat templates render as in evals/chat.py.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional

import lm_eval.models  # noqa: F401 - lm-eval's own model names first: it indexes them only into an empty registry
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from rdp.evals.chat import TEMPLATE_FILE, ChatTemplateError, render_chat
from rdp.evals.checkpoint_info import describe_checkpoint
from rdp.evals.runner import DepthRunner, DepthSettings, SamplingParams
from rdp.evals.tokenizer import EvalTokenizer, load_eval_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "auto": None}


def load_checkpoint(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """A Huginn-layout directory (config.json + safetensors) or a training checkpoint of
    this project (run dir, its checkpoints/ dir, or one step dir)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if (path / "config.json").exists():
        from rdp.pretrain.convert import load_huginn

        model = load_huginn(path, device)
    else:
        from rdp.pretrain.checkpoint import load_model

        model = load_model(path, device)
    if DTYPES[dtype] is not None:
        model.to(DTYPES[dtype])
        model.cos_sin = model.cos_sin.float()  # RoPE stays fp32 (spec)
    return model.eval()


@register_model("rdp")
class RecurrentDepthLM(TemplateLM):
    """model_args: checkpoint, num_steps, init_scale, dtype, device, batch_size,
    exit_criterion, exit_threshold, cache (full|latest|modulo|none), cache_slots,
    tokenizer, seed, max_length, add_bos (default: as the checkpoint was trained),
    chat_template (file or text; default: beside the tokenizer), continuous_compute
    (true|false), draft_steps (0 = no self-drafts), lookup_drafts (true|false). `model=` /
    `tokenizer=` may also be objects (Python use)."""

    instances: list["RecurrentDepthLM"] = []  # lets the CLI report mean steps after a run

    def __init__(self, checkpoint: Optional[str] = None, num_steps: int = 32, init_scale: float = 0.0,
                 dtype: str = "float32", device: str = "cpu", batch_size: int | str = 1,
                 exit_criterion: Optional[str] = None, exit_threshold: Optional[float] = None,
                 cache: str = "full", cache_slots: int = 4, tokenizer=None, seed: int = 1234,
                 max_length: Optional[int] = None, model=None, add_bos=None, chat_template: Optional[str] = None,
                 continuous_compute=False, draft_steps: Optional[int] = None, lookup_drafts=True, **unused):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults to cuda:0; like its HF model, fall back rather than fail
            warnings.warn(f"rdp: device={device} requested but CUDA is not available; using cpu")
            device = "cpu"
        info = None
        if model is None:
            if checkpoint is None:
                raise ValueError("rdp: model_args needs checkpoint=PATH")
            info = describe_checkpoint(checkpoint)  # one concrete directory, read once
            model = load_checkpoint(info.path, device=str(device), dtype=str(dtype))
        self.model, self.checkpoint = model, info
        if not isinstance(tokenizer, EvalTokenizer):
            framing = info.add_bos if info is not None else False
            tokenizer = load_eval_tokenizer(info.path if info else (checkpoint or "."), model.config, tokenizer,
                                            add_bos=framing if add_bos is None else _flag(add_bos),
                                            chat_template=chat_template)
        self.tok = tokenizer
        self.settings = DepthSettings(num_steps=int(num_steps), init_scale=float(init_scale), cache=str(cache),
                                      cache_slots=int(cache_slots), exit_criterion=exit_criterion,
                                      exit_threshold=None if exit_threshold is None else float(exit_threshold),
                                      seed=int(seed), continuous_compute=_flag(continuous_compute, "continuous_compute"),
                                      draft_steps=None if draft_steps is None else int(draft_steps),
                                      lookup_drafts=_flag(lookup_drafts, "lookup_drafts"))
        self.runner = DepthRunner(model, self.settings, eos_token_id=self.tok.eos_id)
        self._batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self._max_length = int(max_length or model.config.max_seq_len)
        self._chat = False  # set once lm-eval renders prompts through the chat template
        RecurrentDepthLM.instances.append(self)

    # ---- what lm-eval asks of a model ------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What precedes a document in training: its BOS, or else the previous document's EOS."""
        return self.tok.bos_id if self.tok.add_bos else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """BOS first when training put one before every document (None: as trained); never
        twice, e.g. after a chat template that writes it itself."""
        ids = self.tok.encode(string, parse_special=self._chat)
        bos = self.tok.add_bos if add_special_tokens is None else add_special_tokens
        return [self.tok.bos_id] + ids if bos and ids[:1] != [self.tok.bos_id] else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    def mean_steps(self) -> float:
        return self.runner.mean_steps()

    # ---- chat templates (--apply_chat_template, --fewshot_as_multiturn, --system_instruction) ----
    @property
    def tokenizer_name(self) -> str:
        """Names the tokenizer and template in lm-eval's request cache keys."""
        template = hashlib.sha256((self.tok.chat_template or "").encode()).hexdigest()[:12]
        return f"rdp-{self.tok.path.stem}-{self.tok.fingerprint[:12]}-{template}"

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if chat_template is False or chat_template is None:
            return None
        if not self.tok.chat_template:
            raise ChatTemplateError(
                f"rdp: --apply_chat_template, but no chat template: pass model_args chat_template=FILE, or put "
                f"{TEMPLATE_FILE} (or tokenizer_config.json with chat_template) beside {self.tok.path}")
        return self.tok.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_template(True)
        self._chat = True
        specials = {"bos_token": self.tok.token_text(self.tok.bos_id),
                    "eos_token": self.tok.token_text(self.tok.eos_id)}
        try:
            return render_chat(self.tok.chat_template, chat_history, add_generation_prompt, **specials)
        except ChatTemplateError:
            if not any(m["role"] == "system" for m in chat_history):
                raise
            # as lm-eval does for Hugging Face models: a template without a system role
            warnings.warn("rdp: the chat template failed with a system message; retrying without it")
            history = [m for m in chat_history if m["role"] != "system"]
            return render_chat(self.tok.chat_template, history, add_generation_prompt, **specials)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[Optional[tuple[float, bool]]] = [None] * len(requests)
        # longest first: each batch pads to similar lengths, and memory trouble shows early
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"rdp loglikelihood r={self.settings.num_steps}")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs, targets = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError(f"loglikelihood request {i} has an empty continuation")
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
                targets.append(continuation[-self.max_length:])
            for i, (logp, greedy) in zip(chunk, self.runner.continuation_logprobs(inputs, targets)):
                results[i] = (float(logp.sum()), bool(greedy.all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        scores = []
        for request in tqdm(requests, disable=disable_tqdm, desc="rdp rolling loglikelihood"):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            pieces = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            score = sum(p[0] for p in pieces)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
            scores.append(score)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[Optional[str]] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one batch shares its generation settings
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"rdp generate r={self.settings.num_steps}")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args for i in chunk])):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, args: list[tuple[str, dict]]) -> list[str]:
        kwargs = dict(args[0][1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", 256)))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature if do_sample or temperature > 0 else 0.0,
                                top_p=float(kwargs.pop("top_p", 1.0) or 1.0), top_k=int(kwargs.pop("top_k", 0) or 0))
        if not do_sample and "do_sample" in args[0][1]:
            params.temperature = 0.0
        prompts = [self.tok_encode(context)[-max(1, self.max_length - max_new):] for context, _ in args]

        def should_stop(row: int, tokens: list[int]) -> bool:
            text = self.tok.decode(tokens)
            return any(stop in text for stop in until)

        outputs = self.runner.generate(prompts, params, should_stop if until else None)
        return [cut_at_stop(self.tok.decode(tokens), until) for tokens in outputs]


def _flag(value, name: str = "add_bos") -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"rdp: {name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


def cut_at_stop(text: str, until: list[str]) -> str:
    cuts = [text.find(stop) for stop in until if stop and stop in text]
    return text[:min(cuts)] if cuts else text
