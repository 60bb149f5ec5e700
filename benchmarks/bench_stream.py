"""Stream benchmarks, measured side by side in one run (prints ratios, asserts nothing).

1. Throughput: tokens/s of the WebDataset stream per worker (in-process, and 2 DataLoader
   workers), as a ratio to reading the same shard bytes raw from disk (plain file reads;
   both from the page cache after a warm-up pass).
2. Resume: time from build_stream + load_state_dict to the first batch at global position
   195,312,500 (800B tokens at 4096 per sample) relative to position 0. The big position
   comes from a fabricated manifest that lists a few real shards many times over (sample
   counts, sizes and checksums are the real ones), so the seek into the tar is real.

    .venv/bin/python benchmarks/bench_stream.py [--workdir DIR] [--seq-len 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


from rdp.data_pipeline import build_stream  # noqa: E402
from rdp.data_pipeline.manifest import read_manifest  # noqa: E402
from rdp.data_pipeline.sample_corpus import write_sample_corpus  # noqa: E402
from rdp.data_pipeline.shards import ShardOptions, write_shards  # noqa: E402
from rdp.data_pipeline.tokenizer import SpecialIds, train_tokenizer  # noqa: E402
from rdp.pretrain.config import load_config  # noqa: E402

VOCAB = 1024
IDS = SpecialIds(bos=VOCAB - 32, eos=VOCAB - 31, pad=VOCAB - 27)
RESUME_POSITION = 195_312_500


def data_config(path: str, seq_len: int, *overrides: str):
    return load_config(None, [f"model.vocab_size={VOCAB}", f"model.bos_token_id={IDS.bos}",
                              f"model.eos_token_id={IDS.eos}", f"model.pad_token_id={IDS.pad}",
                              f"model.end_turn_token_id={VOCAB - 28}", "data.source=webdataset",
                              f"data.paths=[{path}]", f"data.seq_len={seq_len}", *overrides]).data


def raw_read_seconds(directory: Path) -> tuple[float, int]:
    start = time.perf_counter()
    total = 0
    for tar in sorted(directory.glob("*.tar")):
        with open(tar, "rb", buffering=0) as f:
            while block := f.read(1 << 22):
                total += len(block)
    return time.perf_counter() - start, total


def stream_seconds(directory: Path, seq_len: int, workers: int, samples: int, verify: bool) -> float:
    micro = 8
    stream = build_stream(data_config(str(directory), seq_len, f"data.num_workers={workers}",
                                      f"data.verify_checksums={str(verify).lower()}"), VOCAB, micro)
    stream.next_batch()  # start-up (workers, first shard) is not throughput
    start = time.perf_counter()
    for _ in range(samples // micro):
        stream.next_batch()
    elapsed = time.perf_counter() - start
    stream.close()
    return elapsed


def throughput(root: Path, seq_len: int) -> None:
    directory = root / f"shards-{seq_len}"
    if not directory.exists():
        write_shards([str(root / "corpus")], str(root / "tok.model"), str(directory),
                     ShardOptions(seq_len=seq_len, shard_bytes=4 << 20, num_workers=2))
    manifest = read_manifest(str(directory))
    samples = manifest.num_samples
    tokens = samples * seq_len
    raw_read_seconds(directory)  # warm the page cache
    variants = [(0, False), (0, True), (2, False)]
    best = {"raw": float("inf"), **{v: float("inf") for v in variants}}
    for _ in range(3):  # interleaved rounds, best of each: the machine is shared
        best["raw"] = min(best["raw"], raw_read_seconds(directory)[0])
        for workers, verify in variants:
            best[(workers, verify)] = min(best[(workers, verify)],
                                          stream_seconds(directory, seq_len, workers, samples, verify))
    raw_rate = tokens / best["raw"]
    print(f"\n== throughput: {samples} samples x {seq_len} tokens ({manifest.dtype}), {len(manifest.shards)} shards, "
          f"best of 3 interleaved rounds")
    print(f"{'raw file read':42s}{raw_rate / 1e6:10.1f} M tokens/s  (ratio 1.000)")
    for workers, verify in variants:
        per_worker = tokens / best[(workers, verify)] / max(workers, 1)
        label = f"stream, {'in-process' if workers == 0 else f'{workers} DataLoader workers'}, verify={verify}"
        print(f"{label:42s}{per_worker / 1e6:10.3f} M tokens/s per worker  (ratio {per_worker / raw_rate:.4f} of raw)")


def fabricate_manifest(real: Path, out: Path, reach: int) -> int:
    data = json.loads((real / "manifest.json").read_text())
    shards = data["shards"]
    per_cycle = sum(s["samples"] for s in shards)
    cycles = reach // per_cycle + 1
    data["shards"] = [dict(s) for _ in range(cycles) for s in shards]  # same files, real counts/sha256
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(data))
    for s in shards:
        link = out / s["name"]
        if not link.exists():
            os.symlink(real / s["name"], link)
    return len(data["shards"])


def resume_seconds(directory: Path, seq_len: int, position: int, verify: bool) -> tuple[float, float]:
    """(build_stream incl. reading the manifest, load_state_dict + first batch)."""
    cfg = data_config(str(directory), seq_len, f"data.verify_checksums={str(verify).lower()}")
    start = time.perf_counter()
    stream = build_stream(cfg, VOCAB, 8)
    built = time.perf_counter()
    stream.load_state_dict({"position": position})
    stream.next_batch()
    done = time.perf_counter()
    stream.close()
    return built - start, done - built


def resume(root: Path) -> None:
    seq_len = 16
    real = root / "shards-resume"
    if not real.exists():
        write_shards([str(root / "corpus")], str(root / "tok.model"), str(real),
                     ShardOptions(seq_len=seq_len, shard_bytes=4 << 20, num_workers=2))
    big = root / "shards-fabricated"
    entries = fabricate_manifest(real, big, RESUME_POSITION + 1000)
    samples = read_manifest(str(big)).num_samples
    print(f"\n== resume: fabricated manifest of {entries:,} shard entries ({samples:,} samples per epoch) "
          f"over {len(list(real.glob('*.tar')))} real shards")
    print("(with verify, the first batch also hashes the shard it lands in: the shard at position 0 may be a\n"
          " short last shard and the one at 195,312,500 a full one, so compare the verify=False line for the seek)")
    for verify in (False, True):
        times = {0: [], RESUME_POSITION: []}
        for _ in range(7):  # interleaved, medians: the machine is shared
            for position in times:
                times[position].append(resume_seconds(big, seq_len, position, verify))
        base_total = statistics.median(sum(t) for t in times[0])
        base_seek = statistics.median(t[1] for t in times[0])
        for position, values in times.items():
            build = statistics.median(t[0] for t in values)
            seek = statistics.median(t[1] for t in values)
            total = statistics.median(sum(t) for t in values)
            print(f"verify={verify!s:5} position {position:>11,}: build_stream {build * 1e3:6.0f} ms, load_state_dict + "
                  f"first batch {seek * 1e3:6.1f} ms (ratio {seek / base_seek:.2f}), total ratio {total / base_total:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None, help="keep corpus/tokenizer/shards here (default: a temp dir)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=6000)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_stream-"))
    if not (root / "tok.model").exists():
        write_sample_corpus(str(root / "corpus"), documents=args.documents, seed=0, max_words=400)
        train_tokenizer([str(root / "corpus")], VOCAB, str(root / "tok.model"), IDS, max_sentences=20000)
    print(f"workdir {root}")
    throughput(root, args.seq_len)
    resume(root)


if __name__ == "__main__":
    main()
