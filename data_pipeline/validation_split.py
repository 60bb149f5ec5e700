"""A validation split that training never reads.

`rdp data shard --validation-fraction F` holds out whole documents, chosen by a hash of
their text (so a document repeated in the corpus lands on one side only), and writes them
as a shard directory of their own under `OUTPUT/validation/` (its own manifest). Training
reads only the shards listed in `OUTPUT/manifest.json`, so no held-out token reaches it; the
trainer's validation and end-of-run depth losses read `OUTPUT/validation/` (or
`data.validation_paths`, for validation sets kept elsewhere or behind URLs).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from rdp.data_pipeline.manifest import MANIFEST_NAME, DataError, Manifest, is_local, join_location, local_path

VALIDATION_DIR = "validation"


def held_out(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split: a pure function of its text."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0 ** 64


def validation_location(base: str) -> str:
    return join_location(base, VALIDATION_DIR)


def find_validation(paths: list[str]) -> list[str]:
    """The validation shard directories written beside local training shards (empty when
    any source has none: a partial validation set would silently weight the sources)."""
    found = []
    for base in paths:
        location = validation_location(base)
        if not (is_local(location) and os.path.exists(os.path.join(local_path(location), MANIFEST_NAME))):
            return []
        found.append(location)
    return found


def write_with_validation(inputs: list[str], tokenizer_path: str, output_dir: str, options,
                          fraction: float) -> tuple[Manifest, Manifest]:
    """Training shards in `output_dir`, held-out documents in `output_dir/validation`."""
    from rdp.data_pipeline.shards import write_shards

    if not 0 < fraction < 1:
        raise DataError(f"--validation-fraction {fraction}: must be in (0, 1)")
    for directory in (output_dir, os.path.join(output_dir, VALIDATION_DIR)):
        if os.path.exists(os.path.join(directory, MANIFEST_NAME)):
            raise DataError(f"--output {output_dir}: {directory} already holds a {MANIFEST_NAME}; refusing to overwrite")
    target = os.path.join(output_dir, VALIDATION_DIR)
    try:
        validation = write_shards(inputs, tokenizer_path, target,
                                  replace(options, keep_document=lambda text: held_out(text, fraction)))
    except DataError as exc:
        if "no documents with text" in str(exc):
            raise DataError(f"--validation-fraction {fraction}: held out no document of {inputs}; raise it") from None
        raise
    training = write_shards(inputs, tokenizer_path, output_dir,
                            replace(options, keep_document=lambda text: not held_out(text, fraction)))
    return training, validation
