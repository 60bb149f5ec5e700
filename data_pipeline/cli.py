"""`rdp data tokenizer | shard | inspect`."""
from __future__ import annotations

import argparse
import os


def _tokenizer(args: argparse.Namespace) -> int:
    from rdp.data_pipeline.manifest import DataError
    from rdp.data_pipeline.tokenizer import SpecialIds, train_tokenizer

    vocab_size = args.vocab_size
    if args.config:
        from rdp.pretrain.config import load_config

        model = load_config(args.config).model
        vocab_size = vocab_size or model.vocab_size
        if vocab_size != model.vocab_size:
            raise DataError(f"--vocab-size {vocab_size} does not match model.vocab_size {model.vocab_size} of {args.config}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(model, name) is None:
                raise DataError(f"--config {args.config}: model.{name} is unset; set it in the config")
        ids = SpecialIds(bos=model.bos_token_id, eos=model.eos_token_id, pad=model.pad_token_id)
    else:
        if not vocab_size:
            raise DataError("--vocab-size is required without --config")
        layout = SpecialIds.huginn_layout(vocab_size)
        ids = SpecialIds(bos=_pick(args.bos_id, layout.bos), eos=_pick(args.eos_id, layout.eos),
                         pad=_pick(args.pad_id, layout.pad))
    info = train_tokenizer(args.input, vocab_size, args.output, ids, text_field=args.text_field,
                           max_sentences=args.max_sentences, seed=args.seed, num_threads=args.threads)
    print(f"tokenizer {args.output}: vocab {info['vocab_size']}, bos {info['bos_token_id']}, "
          f"eos {info['eos_token_id']}, pad {info['pad_token_id']}, byte fallback")
    print(f"fingerprint {info['fingerprint']}")
    return 0


def _pick(value, default):
    return default if value is None else value


def _shard(args: argparse.Namespace) -> int:
    from rdp.data_pipeline.shards import ShardOptions, parse_size, write_shards

    options = ShardOptions(seq_len=args.seq_len, mode=args.mode, shard_bytes=parse_size(args.shard_size),
                           num_workers=args.workers, text_field=args.text_field, add_bos=args.add_bos)
    if args.validation_fraction:
        from rdp.data_pipeline.validation_split import write_with_validation

        manifest, held_out = write_with_validation(args.input, args.tokenizer, args.output, options,
                                                   args.validation_fraction)
        print(f"{args.output}/validation: {held_out.num_samples:,} held-out samples "
              f"({held_out.total_tokens:,} tokens, never read by training)")
    else:
        manifest = write_shards(args.input, args.tokenizer, args.output, options)
    print(f"{args.output}: {len(manifest.shards)} shard(s), {manifest.num_samples:,} samples of "
          f"{manifest.seq_len}+1 {manifest.dtype} tokens; {manifest.total_tokens:,} corpus tokens, "
          f"{manifest.padding_tokens:,} padding, {manifest.dropped_tokens:,} dropped; documents framed as "
          f"{'BOS + ' if manifest.add_bos else ''}text + EOS")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from rdp.data_pipeline.inspect import inspect

    return inspect(args.dir, verify=args.verify, samples=args.samples, tokenizer=args.tokenizer)


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="tokenizer training, WebDataset shards, shard inspection")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    tok = commands.add_parser("tokenizer", help="train a sentencepiece BPE tokenizer (byte fallback)")
    tok.add_argument("--input", nargs="+", required=True, help="txt / jsonl[.gz] / parquet paths or globs")
    tok.add_argument("--vocab-size", type=int, default=None)
    tok.add_argument("--output", required=True, help="FILE.model (FILE.vocab and FILE.json are written beside it)")
    tok.add_argument("--config", default=None, help="take vocab size and BOS/EOS/PAD ids from this preset's model")
    tok.add_argument("--bos-id", type=int, default=None, help="default: vocab-32 (huginn layout)")
    tok.add_argument("--eos-id", type=int, default=None, help="default: vocab-31")
    tok.add_argument("--pad-id", type=int, default=None, help="default: vocab-27")
    tok.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    tok.add_argument("--max-sentences", type=int, default=2_000_000, help="train on a sample of this many lines")
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    tok.set_defaults(handler=_tokenizer)

    shard = commands.add_parser("shard", help="tokenize and pack a corpus into WebDataset .tar shards")
    shard.add_argument("--input", nargs="+", required=True, help="txt / jsonl[.gz] / parquet paths or globs")
    shard.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    shard.add_argument("--seq-len", type=int, required=True)
    shard.add_argument("--output", required=True, help="new directory for shard-*.tar + manifest.json")
    shard.add_argument("--mode", choices=("keep-all", "truncate"), default="keep-all",
                       help="keep-all: documents run across windows, nothing dropped; truncate: one window per document")
    shard.add_argument("--shard-size", default="64MB", help="target size of one shard")
    shard.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    shard.add_argument("--text-field", default="text")
    shard.add_argument("--no-bos", dest="add_bos", action="store_false",
                       help="no BOS before each document (default: BOS + document + EOS)")
    shard.add_argument("--validation-fraction", type=float, default=0.0,
                       help="hold out this fraction of documents (by a hash of their text) as OUTPUT/validation")
    shard.set_defaults(handler=_shard)

    insp = commands.add_parser("inspect", help="print a shard directory's manifest and a few decoded samples")
    insp.add_argument("dir", help="shard directory or URL (or pipe: command with {})")
    insp.add_argument("--verify", action="store_true", help="check every shard against the manifest")
    insp.add_argument("--samples", type=int, default=3, help="decode this many samples of the first shard")
    insp.add_argument("--tokenizer", default=None, help="default: the path recorded in the manifest")
    insp.set_defaults(handler=_inspect)
