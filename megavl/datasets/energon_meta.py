"""Makes a folder of WebDataset tar shards loadable by megatron-energon, without prompts.

``energon prepare`` asks questions on the terminal; this runs the same
indexing step (``BaseWebdatasetFactory.prepare_dataset``) from code, then
writes the dataset description the interactive tool would write for a
"crude" dataset. Afterwards the folder holds, besides the shards::

    <shard>.tar.idx         per shard: the byte offset of each sample
    .nv-meta/index.sqlite   sample and member offsets (energon's random access)
    .nv-meta/index.uuid
    .nv-meta/.info.json     samples per shard
    .nv-meta/split.yaml     every shard in one split part, in the given order
    .nv-meta/dataset.yaml   the dataset class, below

dataset.yaml declares a ``CrudeWebdataset``: energon hands each sample to
the task encoder's cooker as a plain dict of the tar members, keyed by
extension (``json``, ``img0.png``, ``img1.jpg``, ...) plus ``__key__``,
``__shard__``, ``__restore_key__``, ``__sources__`` and ``__subflavors__``
(``{}`` here). The members stay bytes when the task encoder sets
``decoder = None``; with energon's default decoder the json arrives parsed
(a dict) and images as tensors. The cooker function must be marked
``@stateless``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Sequence

import yaml

META_DIR = ".nv-meta"
DATASET_YAML = "dataset.yaml"

# Exactly what `energon prepare --sample-type CrudeWebdataset` writes: no
# subflavors, so a cooker without a has_subflavors filter matches; a
# metadataset can still add subflavors when it mixes this dataset with others.
CRUDE_DATASET = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset"}

# Indexing is I/O bound and each worker is a forked process; a few suffice.
MAX_WORKERS = 4


def write_energon_metadata(
    dataset_dir: str | os.PathLike, shard_names: Sequence[str], split: str = "train"
) -> dict[str, int]:
    """Indexes the shards and writes ``.nv-meta/``; returns {shard name: sample count}.

    ``shard_names`` are paths relative to ``dataset_dir``; all of them form
    the split part ``split``, listed in the order given (energon's optional
    shuffling of shards between split parts is off). Runs without prompts.
    """
    from megatron.energon.flavors.webdataset.base_webdataset import BaseWebdatasetFactory

    names = list(shard_names)
    if not names:
        raise ValueError(f"no shards to index in {str(dataset_dir)!r}: energon needs at least one")
    # energon brace-expands shard names ("a-{000..009}.tar"), so braces in a
    # real name would select other files.
    braced = [name for name in names if "{" in name or "}" in name]
    if braced:
        raise ValueError(f"shard name {braced[0]!r} contains a brace, which energon reads as a pattern")
    missing = [name for name in names if not os.path.isfile(os.path.join(dataset_dir, name))]
    if missing:
        raise FileNotFoundError(f"shard {missing[0]!r} is not a file in {str(dataset_dir)!r}")

    try:
        # prepare_dataset reports progress with print(); keep the caller's
        # output its own.
        with contextlib.redirect_stdout(io.StringIO()):
            BaseWebdatasetFactory.prepare_dataset(
                dataset_dir,
                names,
                # One part holding every shard, kept in the given order.
                split_parts_ratio=[(split, 1.0)],
                shuffle_seed=None,
                workers=max(1, min(MAX_WORKERS, len(names))),
            )
    except SystemExit:
        # energon exits the process when two samples share a key.
        raise RuntimeError(
            f"energon refused the shards in {str(dataset_dir)!r}: two samples share a key"
        ) from None

    meta = os.path.join(dataset_dir, META_DIR)
    with open(os.path.join(meta, DATASET_YAML), "w", encoding="utf-8") as f:
        yaml.safe_dump(CRUDE_DATASET, f, sort_keys=False)
    with open(os.path.join(meta, ".info.json"), encoding="utf-8") as f:
        return dict(json.load(f)["shard_counts"])

