"""lm-eval the way huginn-0125's numbers were made: lm-eval's own `lm_eval` command finds the
`rdp` model (installed plugin), and its --apply_chat_template / --fewshot_as_multiturn /
--system_instruction reach the prompts through the template beside the tokenizer, rendered
as Hugging Face tokenizers render it, with BOS once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from data_helpers import MODEL, VOCAB

from rdp.evals.chat import ChatTemplateError

BOS, EOS = 480, 481
SYSTEM = "You are a helpful assistant that can assist users with mathematical reasoning."
# written in the style of huginn-0125's template: BOS once, headers, an end-of-turn marker,
# and the {% generation %} block Hugging Face uses for assistant masks
TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|begin_header|>{{ message['role'] }}<|end_header|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|end_turn|>"
    "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|end_turn|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|begin_header|>assistant<|end_header|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A BOS-trained checkpoint with this project's sentencepiece tokenizer and a template."""
    from rdp.data_pipeline.sample_corpus import write_sample_corpus
    from rdp.data_pipeline.tokenizer import SpecialIds, train_tokenizer
    from rdp.evals.lm_adapter import RecurrentDepthLM
    from rdp.pretrain.checkpoint import save_model_weights
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    root = tmp_path_factory.mktemp("chat")
    write_sample_corpus(str(root / "corpus"), documents=40, seed=2)
    config = load_config("tiny", [*MODEL, "data.add_bos=true"])
    save_model_weights(build_model(config.model, seed=0), root / "ckpt", config)
    train_tokenizer([str(root / "corpus")], VOCAB, str(root / "ckpt" / "tokenizer.model"),
                    SpecialIds(bos=BOS, eos=EOS, pad=485), num_threads=1)
    (root / "ckpt" / "chat_template.jinja").write_text(TEMPLATE)
    return RecurrentDepthLM(checkpoint=str(root / "ckpt"), num_steps=2, batch_size=2)


def test_template_renders_like_hugging_face_and_bos_appears_once(lm):
    assert lm.chat_template(True) == TEMPLATE and lm.chat_template(False) is None
    assert lm.tokenizer_name.startswith(f"rdp-tokenizer-{lm.tok.fingerprint[:12]}-")
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Q1 "},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    text = lm.apply_chat_template(chat)
    assert text == (f"<s><|begin_header|>system<|end_header|>\n\n{SYSTEM}<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\nQ1<|end_turn|><|begin_header|>assistant<|end_header|>\n\n"
                    "A1<|end_turn|><|begin_header|>user<|end_header|>\n\nQ2<|end_turn|>"
                    "<|begin_header|>assistant<|end_header|>\n\n")
    ids = lm.tok_encode(text)
    assert ids[0] == BOS and BOS not in ids[1:]  # the template's BOS, none added again
    assert lm.tok.decode(ids) == text.removeprefix("<s>")
    # a prefilled assistant turn stays open, so the model continues it (lm-eval's gen_prefix)
    prefilled = lm.apply_chat_template(chat + [{"role": "assistant", "content": "The answer is"}],
                                       add_generation_prompt=False)
    assert prefilled == text + "The answer is"


def test_plain_lm_eval_command_runs_the_rdp_model_with_the_chat_flags(lm, tmp_path):
    from rdp.evals.gsm8k import write_local_tasks
    from rdp.evals.testing import write_gsm8k_jsonl

    plugin = Path(sysconfig.get_paths()["purelib"]) / "rdp-lm-eval-plugin.pth"
    assert plugin.is_file(), f"{plugin} is missing: reinstall rdp (scripts/setup.sh or pip install -e .)"
    task = write_local_tasks(write_gsm8k_jsonl(tmp_path / "gsm8k"), tmp_path / "tasks")["gsm8k_cot"]
    command = [str(Path(sys.executable).parent / "lm_eval"), "--model", "rdp",
               "--model_args", f"checkpoint={lm.checkpoint.path},num_steps=2", "--tasks", task,
               "--include_path", str(tmp_path / "tasks"), "--num_fewshot", "2", "--limit", "1",
               "--apply_chat_template", "--fewshot_as_multiturn", "--system_instruction", SYSTEM,
               "--gen_kwargs", "max_gen_toks=2", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact_match" in done.stdout and task in done.stdout
    (samples,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
    prompts = {json.loads(line)["arguments"]["gen_args_0"]["arg_0"] for line in samples.read_text().splitlines()}
    (prompt,) = prompts  # one per answer filter, all the same
    assert prompt.startswith(f"<s><|begin_header|>system<|end_header|>\n\n{SYSTEM}<|end_turn|>")
    assert prompt.count("<|begin_header|>user") == 3 and prompt.count("<|begin_header|>assistant") == 3  # 2 shots
    assert prompt.endswith("<|begin_header|>assistant<|end_header|>\n\n")


def test_chat_flags_without_a_template_are_refused(lm, tmp_path, capsys):
    from rdp.evals.lm_adapter import RecurrentDepthLM
    from rdp.evals.tokenizer import EvalTokenizer
    from rdp.launch.cli import main as rdp

    bare = RecurrentDepthLM(model=lm.model, tokenizer=EvalTokenizer(lm.tok.path, BOS, EOS, add_bos=True))
    with pytest.raises(ChatTemplateError, match="--apply_chat_template, but no chat template: pass model_args "
                                                "chat_template=FILE, or put chat_template.jinja"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rdp(["eval", str(tmp_path), "--tasks", "gsm8k", "--fewshot_as_multiturn"]) == 2
    assert capsys.readouterr().err.strip() == "rdp eval: error: --fewshot_as_multiturn needs --apply_chat_template"
