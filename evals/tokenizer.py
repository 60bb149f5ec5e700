"""Text <-> tokens for evaluation: this project's sentencepiece model, or a Hugging Face
tokenizer.json next to an imported Huginn checkpoint (read offline by `tokenizers`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class EvalTokenizer:
    """encode / decode without special tokens; BOS / EOS come from the model config."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        self.bos_id, self.eos_id = bos_id, eos_id
        if self.path.suffix == ".json":
            from tokenizers import Tokenizer

            self._hf = Tokenizer.from_file(str(self.path))
            self._sp = None
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
            self._hf = None

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size() if self._hf is not None else self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # specials and ids past the tokenizer's vocabulary (the model's vocab is padded) have no text
        size = self.vocab_size
        ids = [i for i in ids if i not in (self.bos_id, self.eos_id) and 0 <= i < size]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)


def find_tokenizer(checkpoint: str | Path) -> Optional[Path]:
    """tokenizer.json / tokenizer.model in the checkpoint dir or up to two parents
    (a step dir sits in RUN_DIR/checkpoints/)."""
    directory = Path(checkpoint)
    for candidate_dir in (directory, directory.parent, directory.parent.parent):
        for name in TOKENIZER_FILES:
            if (candidate_dir / name).is_file():
                return candidate_dir / name
    return None


def load_eval_tokenizer(checkpoint: str | Path, model_cfg, path: Optional[str | Path] = None) -> EvalTokenizer:
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
    tok = EvalTokenizer(path, model_cfg.bos_token_id, model_cfg.eos_token_id)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} tokens, more than model vocab_size={model_cfg.vocab_size}")
    return tok
