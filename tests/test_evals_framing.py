"""Training and evaluation frame text alike: a training window scored by the lm-eval adapter
has exactly the trainer's loss, whether packing put BOS before each document or not.

The corpus is two documents of exactly L tokens each, so with seq_len L a window holds one
whole document behind what precedes it in training: its BOS, or the previous document's EOS.
The adapter gets only the checkpoint's run dir and the document's text: the tokenizer comes
from the run dir (copied there by training), the framing from the checkpoint's config; a
Huginn-layout export (and its import back) carries both."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rdp.data_pipeline import build_stream, document_bos
from rdp.data_pipeline.manifest import DataError
from rdp.data_pipeline.sample_corpus import write_sample_corpus
from rdp.data_pipeline.shards import ShardOptions, write_shards
from rdp.data_pipeline.tokenizer import SpecialIds, load_tokenizer, train_tokenizer
from rdp.launch.cli import main as rdp
from rdp.pretrain.config import load_config
from data_helpers import MODEL, VOCAB

BOS, EOS = 480, 481
DEPTH = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(tokenizer path, two document texts of L tokens each, L)."""
    root = tmp_path_factory.mktemp("framing")
    documents = write_sample_corpus(str(root / "raw"), documents=60, seed=5)
    tokenizer_path = str(root / "tok.model")
    train_tokenizer([str(root / "raw")], VOCAB, tokenizer_path, SpecialIds(bos=BOS, eos=EOS, pad=485), num_threads=1)
    tokenizer = load_tokenizer(tokenizer_path)
    length = 24
    texts = []
    for document in documents:  # cut to L tokens where the cut text tokenizes back to the same L
        text = tokenizer.decode(tokenizer.encode(document)[:length])
        if len(tokenizer.encode(document)) > length and tokenizer.encode(text) == tokenizer.encode(document)[:length]:
            texts.append(text)
    texts = texts[:2]
    assert len(texts) == 2
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root, tokenizer_path, texts, length


def _config(root: Path, shards: Path, tokenizer_path: str, length: int, run_dir: Path, *extra):
    return load_config("tiny", [*MODEL, "data.source=webdataset", f"data.paths=[{shards}]", f"data.seq_len={length}",
                                f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}", "train.max_steps=1",
                                "train.micro_batch_size=3", "train.eval_depths=[]", "train.precision=fp32", *extra])


@pytest.mark.parametrize("add_bos", [True, False])
def test_adapter_loglikelihood_of_a_training_window_is_the_trainers_loss(corpus, tmp_path, add_bos):
    from lm_eval.api.instance import Instance

    from rdp.evals.lm_adapter import RecurrentDepthLM
    from rdp.pretrain.train import Trainer

    root, tokenizer_path, texts, length = corpus
    shards = tmp_path / "shards"
    manifest = write_shards([str(root / "docs.jsonl")], tokenizer_path, str(shards),
                            ShardOptions(seq_len=length, num_workers=0, add_bos=add_bos))
    assert manifest.add_bos is add_bos and manifest.add_eos
    ids = [load_tokenizer(tokenizer_path).encode(t) for t in texts]
    # the window holding a whole document behind what training put before it
    document, window = (0, [BOS] + ids[0]) if add_bos else (1, [EOS] + ids[1])

    config = _config(root, shards, tokenizer_path, length, tmp_path / "run")
    trainer = Trainer(config, progress=False)
    try:
        trainer.run()  # one step, then the checkpoint
        inputs, labels = build_stream(config.data, config.model.vocab_size, 3).next_batch()
        rows = [r for r in range(3) if inputs[r].tolist() + labels[r, -1:].tolist() == window]
        assert len(rows) == 1, "the window is in the shards exactly once"
        trainer.engine.eval()
        with torch.no_grad():
            loss = trainer.engine(inputs[rows], labels[rows], DEPTH, init_scale=0.0).item()
    finally:
        trainer.close()
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    saved = load_config(next((tmp_path / "run" / "checkpoints").glob("step_*")) / "config.yaml")
    assert saved.data.add_bos is add_bos

    lm = RecurrentDepthLM(checkpoint=str(tmp_path / "run"), num_steps=DEPTH, init_scale=0.0)
    assert lm.tok.add_bos is add_bos and lm.tok_encode(texts[document]) == window[1 - add_bos:]
    request = [Instance("loglikelihood", {}, ("", texts[document]), 0)]
    (logprob, _), = lm.loglikelihood(request)
    assert -logprob / length == pytest.approx(loss, rel=1e-5, abs=1e-6)

    # exported with its tokenizer and framing, and imported back, it scores the same
    hf, back = tmp_path / "hf", tmp_path / "back"
    assert rdp(["convert", "to-huginn", str(tmp_path / "run"), str(hf)]) == 0
    exported = json.loads((hf / "tokenizer_config.json").read_text())
    assert exported["add_bos_token"] is add_bos and exported["bos_token"] == "<s>"
    assert (hf / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    assert rdp(["convert", "from-huginn", str(hf), str(back)]) == 0
    assert load_config(back / "config.yaml").data.add_bos is add_bos
    for directory in (hf, back):
        (again, _), = RecurrentDepthLM(checkpoint=str(directory), num_steps=DEPTH, init_scale=0.0).loglikelihood(request)
        assert again == pytest.approx(logprob, abs=1e-5)


def test_framing_disagreements_are_refused(corpus, tmp_path):
    root, tokenizer_path, _, length = corpus
    shards = tmp_path / "shards"
    write_shards([str(root / "docs.jsonl")], tokenizer_path, str(shards), ShardOptions(seq_len=length, num_workers=0))
    config = _config(root, shards, tokenizer_path, length, tmp_path / "run", "data.add_bos=false")
    stream = build_stream(config.data, config.model.vocab_size, 1)
    with pytest.raises(DataError, match=r"data.add_bos: False, but the shards in .* put BOS before each document"):
        document_bos(config, stream)
    config.data.add_bos = None
    config.model.eos_token_id = 482
    with pytest.raises(DataError, match=r"manifest.json: eos_token_id 481 differs from model.eos_token_id 482"):
        document_bos(config, stream)
    config.model.eos_token_id = EOS
    assert document_bos(config, stream) is True
    stream.close()


def test_a_run_dir_keeps_the_tokenizer_it_started_with(corpus, tmp_path):
    from rdp.data_pipeline.tokenizer import save_run_tokenizer

    _, tokenizer_path, _, _ = corpus
    config = load_config("tiny", [f"data.tokenizer={tokenizer_path}"])
    save_run_tokenizer(config.data, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
    other = tmp_path / "other.model"
    other.write_bytes(Path(tokenizer_path).read_bytes() + b"\0")
    config.data.tokenizer = str(other)
    with pytest.raises(DataError, match="differs from the .*tokenizer.model this run was started with"):
        save_run_tokenizer(config.data, tmp_path / "run", write=False)
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == Path(tokenizer_path).read_bytes()
