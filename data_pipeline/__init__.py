"""Tokenizers, WebDataset shards, reasoning tasks and the resumable training streams."""
from __future__ import annotations

import os


def check_data_files(data_cfg) -> None:
    """Local files the config names exist (run before any process group or model is built)."""
    if data_cfg.tokenizer and not os.path.isfile(data_cfg.tokenizer):
        from rdp.data_pipeline.manifest import DataError

        raise DataError(f"data.tokenizer {data_cfg.tokenizer!r}: no such file (the tokenizer .model the shards were made with)")


def build_stream(data_cfg, vocab_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1):
    """The training stream for one data-parallel rank: `next_batch()` gives (inputs, labels),
    `state_dict()` / `load_state_dict()` hold the global position."""
    check_data_files(data_cfg)
    if data_cfg.source == "synthetic":
        from rdp.data_pipeline.synthetic import SyntheticStream

        return SyntheticStream(data_cfg.seq_len, vocab_size, micro_batch_size, data_cfg.seed, rank, world_size)
    if data_cfg.source == "webdataset":
        from rdp.data_pipeline.stream import ShardStream

        spec = stream_spec(data_cfg, vocab_size, micro_batch_size, rank, world_size)
        return ShardStream(spec, num_workers=data_cfg.num_workers)
    from rdp.data_pipeline.tasks import TaskStream, task_of_source

    task = task_of_source(data_cfg.source)
    if task is not None:  # a built-in reasoning task or a task directory
        return TaskStream(task, data_cfg.seq_len, vocab_size, micro_batch_size, data_cfg.seed, rank, world_size)
    raise ValueError(f"data.source={data_cfg.source!r}: must be synthetic, webdataset or task:NAME_OR_DIR")


def stream_spec(data_cfg, vocab_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1):
    """Read every manifest and check it against the config, naming the field that disagrees."""
    from rdp.data_pipeline.manifest import DataError, MANIFEST_NAME, join_location, read_manifest
    from rdp.data_pipeline.stream import StreamSpec
    from rdp.data_pipeline.tokenizer import tokenizer_fingerprint

    paths = list(data_cfg.paths)
    if not paths:
        raise DataError("data.paths: data.source=webdataset needs at least one shard directory or URL")
    weights = list(data_cfg.weights) or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise DataError(f"data.weights: {len(weights)} weights for {len(paths)} paths")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    expected_fingerprint = tokenizer_fingerprint(data_cfg.tokenizer) if data_cfg.tokenizer else None
    manifests = []
    for path in paths:
        manifest = read_manifest(path)
        where = join_location(path, MANIFEST_NAME)
        if manifest.vocab_size != vocab_size:
            raise DataError(f"{where}: vocab_size {manifest.vocab_size} (the tokenizer's) does not match "
                            f"model.vocab_size {vocab_size}")
        if manifest.seq_len != data_cfg.seq_len:
            raise DataError(f"{where}: seq_len {manifest.seq_len} does not match data.seq_len {data_cfg.seq_len}")
        if expected_fingerprint and manifest.tokenizer_fingerprint != expected_fingerprint:
            raise DataError(f"{where}: tokenizer_fingerprint {manifest.tokenizer_fingerprint[:16]}... does not match "
                            f"data.tokenizer {data_cfg.tokenizer} ({expected_fingerprint[:16]}...)")
        if manifests and manifest.tokenizer_fingerprint != manifests[0].tokenizer_fingerprint:
            raise DataError(f"{where}: tokenizer_fingerprint differs from {paths[0]}'s: sources made by different "
                            f"tokenizers cannot be mixed")
        if manifests and manifest.pad_token_id != manifests[0].pad_token_id:
            raise DataError(f"{where}: pad_token_id {manifest.pad_token_id} differs from {paths[0]}'s")
        if manifests and manifest.add_bos != manifests[0].add_bos:
            raise DataError(f"{where}: add_bos {manifest.add_bos} differs from {paths[0]}'s: sources that frame "
                            f"documents differently cannot be mixed")
        manifests.append(manifest)
    return StreamSpec(bases=paths, manifests=manifests, weights=[float(w) for w in weights], seq_len=data_cfg.seq_len,
                      micro_batch_size=micro_batch_size, rank=rank, world_size=world_size, seed=data_cfg.seed,
                      skip_corrupt=data_cfg.skip_corrupt, verify_checksums=data_cfg.verify_checksums)


def document_bos(config, stream) -> bool:
    """Whether the training documents start with BOS. The trainer stores the answer in
    data.add_bos, so every checkpoint's config says how text was framed and evaluation frames
    it the same way. Shards must use the model's BOS / EOS ids; the built-in synthetic and
    reasoning streams have no documents, hence no BOS."""
    from rdp.data_pipeline.manifest import DataError, MANIFEST_NAME, join_location

    spec = getattr(stream, "spec", None)
    found = bool(spec.manifests[0].add_bos) if spec is not None else False
    if spec is not None:
        model = config.model
        for path, manifest in zip(spec.bases, spec.manifests):
            for name in ("bos_token_id", "eos_token_id") if manifest.add_bos else ("eos_token_id",):
                if getattr(manifest, name) != getattr(model, name):
                    raise DataError(f"{join_location(path, MANIFEST_NAME)}: {name} {getattr(manifest, name)} differs "
                                    f"from model.{name} {getattr(model, name)}; the documents would be framed with "
                                    f"other tokens than evaluation uses")
    wanted = config.data.add_bos
    if wanted is not None and bool(wanted) != found:
        where = f"the shards in {spec.bases[0]}" if spec is not None else f"data.source={config.data.source}"
        raise DataError(f"data.add_bos: {wanted}, but {where} {'put' if found else 'put no'} BOS before each document")
    return found
