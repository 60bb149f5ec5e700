"""Checkpoints and tokenizers the evaluator accepts: this project's training checkpoint
with its sentencepiece model, and a Huginn-layout export with a tokenizer.json."""
from __future__ import annotations

import shutil

import pytest
import torch

from rdp.evals.lm_adapter import load_checkpoint
from rdp.evals.testing import GSM8K_ROWS, write_tiny_checkpoint
from rdp.evals.tokenizer import EvalTokenizer, load_eval_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("evals_loading") / "ckpt")


def test_sentencepiece_model_of_this_project(tmp_path, checkpoint):
    import sentencepiece as spm

    from rdp.pretrain.checkpoint import write_manifest

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{r['question']} {r['answer']}" for r in GSM8K_ROWS * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=90,
                                   model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1)
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoints" / "step_00000001")
    (run_dir / "checkpoints" / "step_00000001" / "tokenizer.json").unlink()
    write_manifest(run_dir / "checkpoints" / "step_00000001")
    (run_dir / "checkpoints" / "latest").write_text("step_00000001")
    shutil.copy(tmp_path / "tokenizer.model", run_dir / "tokenizer.model")  # found two levels up
    model = load_checkpoint(run_dir)
    tok = load_eval_tokenizer(run_dir / "checkpoints" / "step_00000001", model.config)
    text = "Tom has 3 apples."
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id] + tok.encode(text) + [tok.eos_id]) == text


def test_huginn_layout_scores_like_the_training_checkpoint(tmp_path, checkpoint):
    from rdp.pretrain.convert import save_huginn

    trained = load_checkpoint(checkpoint)
    huginn_dir = save_huginn(trained, tmp_path / "huginn")
    shutil.copy(checkpoint / "tokenizer.json", huginn_dir / "tokenizer.json")
    imported = load_checkpoint(huginn_dir)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        a = trained(ids, num_steps=3, init_scale=0.0).logits
        b = imported(ids, num_steps=3, init_scale=0.0).logits
    torch.testing.assert_close(a, b)
    tok = load_eval_tokenizer(huginn_dir, imported.config)
    assert isinstance(tok, EvalTokenizer) and tok.path.name == "tokenizer.json"


def test_bad_inputs_name_what_is_wrong(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(checkpoint, dtype="float8")
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_eval_tokenizer(bare, load_checkpoint(bare).config)
    bf16 = load_checkpoint(checkpoint, dtype="bfloat16")
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16 and bf16.cos_sin.dtype == torch.float32
