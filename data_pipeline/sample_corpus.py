"""A small multilingual corpus in every input format, generated from a seed: what tests and
benchmarks shard when no real corpus is at hand (nothing is downloaded)."""
from __future__ import annotations

import gzip
import json
import os
import random

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "zu", "pe", "qua", "xen", "über", "naïve",
              "日本", "語", "données", "ñ", "ß", "🙂"]


def _document(rng: random.Random, words: list[str], min_words: int, max_words: int) -> str:
    count = rng.randint(min_words, max_words)
    sentence = []
    for i in range(count):
        sentence.append(rng.choice(words) + (rng.choice([".", ",", "", "", "", "\n"]) if i % 7 == 6 else ""))
    return " ".join(sentence)


def write_sample_corpus(directory: str, documents: int = 400, seed: int = 0, min_words: int = 5,
                        max_words: int = 120) -> list[str]:
    """Write corpus.jsonl, corpus2.jsonl.gz, notes-*.txt and table.parquet; return the documents
    in the order `expand_inputs(directory)` reads them (sorted file names, then file order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    docs = [_document(rng, words, min_words, max_words) for _ in range(documents)]
    os.makedirs(directory, exist_ok=True)
    quarter = documents // 4
    parts = {"corpus.jsonl": docs[:quarter], "corpus2.jsonl.gz": docs[quarter:2 * quarter],
             "notes-0.txt": [docs[2 * quarter]], "notes-1.txt": [docs[2 * quarter + 1]],
             "table.parquet": docs[2 * quarter + 2:]}
    for name, texts in parts.items():
        path = os.path.join(directory, name)
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path)
        elif name.endswith(".txt"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(texts[0])
        else:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "wt", encoding="utf-8") as f:
                for text in texts:
                    f.write(json.dumps({"text": text, "meta": {"n": len(text)}}, ensure_ascii=False) + "\n")
    return [text for name in sorted(parts) for text in parts[name]]
