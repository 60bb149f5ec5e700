"""Tiny artefacts for tests and smoke runs: a checkpoint of this project's layout with a
Hugging Face tokenizer.json next to it, a run's published checkpoint, and a GSM8K-format jsonl."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = 7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?",
     "answer": "2 boxes hold 2 * 6 = 12 pens.\n#### 12"},
    {"question": "Sam had 10 coins and spent 4. How many coins are left?",
     "answer": "10 - 4 = 6 coins are left.\n#### 6"},
]
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!+-*/=#$()\n'\"_<>"


def write_tiny_tokenizer(path: Path, vocab_size: int = 110) -> Path:
    """A character-level BPE with Metaspace (decodes back to the exact text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in GSM8K_ROWS] + [ALPHABET]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"]))
    tok.save(str(path))
    return path


def write_tiny_checkpoint(directory: Path, preset: str = "tiny", seed: int = 0, overrides=None) -> Path:
    """A randomly initialised model saved as a training checkpoint, tokenizer.json beside it."""
    from rdp.pretrain.checkpoint import save_model_weights
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    config = load_config(preset, overrides or [])
    model = build_model(config.model, seed=seed)
    save_model_weights(model, directory, config)
    write_tiny_tokenizer(directory / "tokenizer.json", vocab_size=min(110, config.model.bos_token_id))
    return directory


def publish_step(run_dir: Path, step: int, seed: int = 0, preset: str = "tiny") -> Path:
    """RUN_DIR/checkpoints/step_N as `rdp train` publishes it (manifest, `latest` pointer),
    holding a randomly initialised model; returns the step dir."""
    from rdp.pretrain.checkpoint import publish, save_model_weights, staging_dir, write_json
    from rdp.pretrain.config import load_config
    from rdp.pretrain.model import build_model

    config = load_config(preset)
    root = Path(run_dir) / "checkpoints"
    staging = staging_dir(root, step)
    save_model_weights(build_model(config.model, seed=seed), staging, config)
    write_json(staging / "trainer_state.json", {"step": step})
    return publish(staging, root, step)


def weights_sha256(step_dir: Path) -> str:
    """What results record for a step dir, computed here from the file itself."""
    return hashlib.sha256(b"model.safetensors\0" + (Path(step_dir) / "model.safetensors").read_bytes()).hexdigest()


def write_gsm8k_jsonl(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(directory / f"{split}.jsonl", "w") as f:
            for row in GSM8K_ROWS:
                f.write(json.dumps(row) + "\n")
    return directory
