"""Text <-> tokens for evaluation: this project's sentencepiece model, or a Hugging Face
tokenizer.json next to an imported Huginn checkpoint (read offline by `tokenizers`).

Text is framed the way the model was trained: with `add_bos`, a BOS token starts every
prompt (as it started every training document); without it, prompts start bare and an empty
context is the EOS that ended the previous document. The checkpoint says which (see
evals/checkpoint_info.py).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from rdp.data_pipeline.tokenizer import find_checkpoint_tokenizer


class EvalTokenizer:
    """encode / decode without special tokens; BOS / EOS ids come from the model config."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int, add_bos: bool = False,
                 chat_template: Optional[str] = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, bool(add_bos)
        self.chat_template = chat_template
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.path))
            self._sp = None
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self._hf = None
        self._specials = self._special_pieces()

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size() if self._hf is not None else self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def token_text(self, token_id: int) -> str:
        """How a special token is written inside a chat template (e.g. <|begin_text|>, <s>)."""
        if self._hf is not None:
            return self._hf.id_to_token(token_id) or ""
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else ""

    def _special_pieces(self) -> dict[str, int]:
        if self._sp is None:
            return {}  # `tokenizers` matches its own special tokens in text
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, no BOS/EOS added. `parse_special`: a special token written out
        in the text (a chat template's `<s>`) becomes its id, as Hugging Face tokenizers
        do; sentencepiece alone would spell it out as characters."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        if not parse_special or not self._specials:
            return self._sp.encode(text)
        ids: list[int] = []
        pattern = "(" + "|".join(re.escape(p) for p in sorted(self._specials, key=len, reverse=True)) + ")"
        for part in re.split(pattern, text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids: list[int]) -> str:
        # specials and ids past the tokenizer's vocabulary (the model's vocab is padded) have no text
        size = self.vocab_size
        ids = [i for i in ids if i not in (self.bos_id, self.eos_id) and 0 <= i < size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)


def find_tokenizer(checkpoint: str | Path) -> Optional[Path]:
    return find_checkpoint_tokenizer(checkpoint)


def load_eval_tokenizer(checkpoint: str | Path, model_cfg, path: Optional[str | Path] = None,
                        add_bos: bool = False, chat_template: Optional[str] = None) -> EvalTokenizer:
    from rdp.evals.chat import find_chat_template

    path = Path(path) if path else find_tokenizer(checkpoint)
    if path is None:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer.json or tokenizer.model next to the checkpoint; "
                                "pass tokenizer=PATH")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(model_cfg, name) is None:
            from rdp.pretrain.config import ConfigError

            raise ConfigError(f"config field 'model.{name}': unset in {checkpoint} (an imported Huginn config.json "
                              f"named none inside the vocabulary); evaluation needs BOS and EOS: set both in the "
                              f"checkpoint's config.yaml")
    tok = EvalTokenizer(path, model_cfg.bos_token_id, model_cfg.eos_token_id, add_bos,
                        find_chat_template(path.parent, chat_template))
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} tokens, more than model vocab_size={model_cfg.vocab_size}")
    return tok
