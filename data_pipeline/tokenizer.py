"""sentencepiece BPE tokenizer training, with the model config's special-token ids.

The tokenizer's fingerprint is the sha256 of its .model file; shard manifests record it and
the stream refuses shards made by a different tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Iterator

from rdp.data_pipeline.corpus import expand_inputs, file_sha256, read_documents
from rdp.data_pipeline.manifest import DataError

# sentencepiece drops training sentences longer than this (bytes); we cut documents into lines
MAX_SENTENCE_BYTES = 8192


@dataclass
class SpecialIds:
    bos: int
    eos: int
    pad: int
    unk: int = 0

    @classmethod
    def huginn_layout(cls, vocab_size: int) -> "SpecialIds":
        """huginn-0125's placement relative to the end of the vocabulary (65504/65505/65509 at 65536)."""
        return cls(bos=vocab_size - 32, eos=vocab_size - 31, pad=vocab_size - 27)


def tokenizer_fingerprint(model_path: str) -> str:
    return file_sha256(model_path)


def _training_sentences(files: list[str], text_field: str, max_sentences: int) -> Iterator[str]:
    """At most max_sentences lines, an equal quota from each file (in order, one file open at
    a time), so a bounded sample still spans every source."""
    quota = -(-max_sentences // len(files))
    for path in files:
        taken = 0
        documents = read_documents(path, text_field)
        for document in documents:
            for line in document.splitlines():
                line = line.strip()
                if line:
                    yield line.encode("utf-8")[:MAX_SENTENCE_BYTES].decode("utf-8", "ignore")
                    taken += 1
                if taken >= quota:
                    break
            if taken >= quota:
                documents.close()
                break


def train_tokenizer(inputs: list[str], vocab_size: int, output: str, ids: SpecialIds | None = None,
                    text_field: str = "text", max_sentences: int = 2_000_000, seed: int = 0,
                    num_threads: int = 2) -> dict:
    """Train a BPE model with byte fallback on (a sample of) the corpus; write FILE and FILE.json."""
    import sentencepiece as spm

    ids = ids or SpecialIds.huginn_layout(vocab_size)
    for name in ("bos", "eos", "pad", "unk"):
        value = getattr(ids, name)
        if not 0 <= value < vocab_size:
            raise DataError(f"tokenizer {name}_id {value} is outside the vocabulary [0, {vocab_size})")
    if len({ids.bos, ids.eos, ids.pad, ids.unk}) != 4:
        raise DataError(f"tokenizer special ids must differ: {ids}")
    if vocab_size < 256 + 4:
        raise DataError(f"--vocab-size {vocab_size}: byte fallback needs at least 260 entries")
    files = expand_inputs(inputs)
    prefix = output[:-len(".model")] if output.endswith(".model") else output
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(files, text_field, max_sentences),
            model_prefix=prefix, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            bos_id=ids.bos, eos_id=ids.eos, pad_id=ids.pad, unk_id=ids.unk,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=MAX_SENTENCE_BYTES, character_coverage=0.9995,
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            normalization_rule_name="identity", num_threads=num_threads, minloglevel=2)
    except RuntimeError as exc:
        raise DataError(f"sentencepiece training on {len(files)} file(s) failed: {exc}") from None
    model_path = prefix + ".model"
    info = {"model": os.path.basename(model_path), "fingerprint": tokenizer_fingerprint(model_path),
            "vocab_size": vocab_size, "bos_token_id": ids.bos, "eos_token_id": ids.eos,
            "pad_token_id": ids.pad, "unk_token_id": ids.unk, "byte_fallback": True,
            "sources": files}
    with open(prefix + ".json", "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return info


def load_tokenizer(model_path: str):
    import sentencepiece as spm

    if not os.path.exists(model_path):
        raise DataError(f"tokenizer {model_path}: no such file")
    try:
        return spm.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"tokenizer {model_path}: not a sentencepiece model ({exc})") from None


RUN_TOKENIZER = "tokenizer.model"  # a run dir's copy of data.tokenizer, where evaluation looks
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # Hugging Face's, or this project's sentencepiece
TOKENIZER_CONFIG = "tokenizer_config.json"  # Hugging Face's: add_bos_token, special tokens, chat_template
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def save_run_tokenizer(data_cfg, run_dir, write: bool = True) -> None:
    """Copy data.tokenizer into the run dir, so the run carries the tokenizer it was trained
    with. Every rank checks (so all fail alike); only `write` copies. A run dir that already
    holds a different tokenizer is an error, never overwritten."""
    if not data_cfg.tokenizer:
        return
    source = data_cfg.tokenizer
    if not os.path.isfile(source):
        raise DataError(f"data.tokenizer: {source}: no such file")
    target = os.path.join(run_dir, RUN_TOKENIZER)
    if os.path.exists(target):
        if tokenizer_fingerprint(target) != tokenizer_fingerprint(source):
            raise DataError(f"data.tokenizer: {source} differs from the {target} this run was started with; "
                            f"refusing to replace it (use another train.run_dir)")
        return
    if write:
        os.makedirs(run_dir, exist_ok=True)
        temporary = f"{target}.tmp"
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


def _is_rdp_sidecar(path) -> bool:
    """`rdp data tokenizer --output tokenizer.model` also writes tokenizer.json: its ids and
    fingerprint, not a Hugging Face tokenizer."""
    if not (os.path.basename(path) == "tokenizer.json" and os.path.isfile(os.path.join(os.path.dirname(path),
                                                                                       "tokenizer.model"))):
        return False
    try:
        with open(path) as handle:
            return "fingerprint" in json.load(handle)
    except (ValueError, UnicodeDecodeError):
        return False


def find_checkpoint_tokenizer(checkpoint):
    """tokenizer.json / tokenizer.model in a checkpoint dir or up to two parents (a step dir
    sits in RUN_DIR/checkpoints/, and training copies the tokenizer to RUN_DIR); None if none."""
    from pathlib import Path

    directory = Path(checkpoint)
    for candidate_dir in (directory, directory.parent, directory.parent.parent):
        for name in TOKENIZER_FILES:
            if (candidate_dir / name).is_file() and not _is_rdp_sidecar(candidate_dir / name):
                return candidate_dir / name
    return None


def _token_text(tokenizer_path, token_id: int):
    if str(tokenizer_path).endswith(".json"):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_path)).id_to_token(token_id)
    processor = load_tokenizer(str(tokenizer_path))
    return processor.id_to_piece(token_id) if 0 <= token_id < processor.vocab_size() else None


def export_tokenizer(tokenizer_path, output_dir, add_bos: bool, bos_id: int, eos_id: int, pad_id: int) -> None:
    """Copy a tokenizer (and a chat_template.jinja beside it) into a Huginn-layout dir, with a
    tokenizer_config.json saying how training framed documents (add_bos_token) and naming the
    special tokens; fields of an existing tokenizer_config.json beside it are kept."""
    source_dir = os.path.dirname(os.path.abspath(tokenizer_path))
    shutil.copyfile(tokenizer_path, os.path.join(output_dir, os.path.basename(tokenizer_path)))
    config = {}
    if os.path.isfile(os.path.join(source_dir, TOKENIZER_CONFIG)):
        with open(os.path.join(source_dir, TOKENIZER_CONFIG)) as handle:
            config = json.load(handle)
    config.update(add_bos_token=bool(add_bos), add_eos_token=False)
    for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id)):
        text = _token_text(tokenizer_path, token_id) if token_id is not None else None
        if text:
            config.setdefault(key, text)
    if os.path.isfile(os.path.join(source_dir, CHAT_TEMPLATE_FILE)):
        shutil.copyfile(os.path.join(source_dir, CHAT_TEMPLATE_FILE), os.path.join(output_dir, CHAT_TEMPLATE_FILE))
    with open(os.path.join(output_dir, TOKENIZER_CONFIG), "w") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")


def import_tokenizer(source_dir, output_dir) -> bool:
    """Copy a Huginn-layout dir's tokenizer files into a checkpoint dir; returns whether its
    documents started with BOS (tokenizer_config.json's add_bos_token; huginn-0125's did)."""
    config = {}
    for name in (*TOKENIZER_FILES, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE):
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(output_dir, name))
            if name == TOKENIZER_CONFIG:
                with open(path) as handle:
                    config = json.load(handle)
    return bool(config.get("add_bos_token", True))
