"""Start-up checks of a data path, before any loader worker starts.

A dataset folder must be energon-prepared and hold the split part asked for;
a metadataset's per-dataset settings must be valid, so a typo fails at once
with the dataset's name instead of as failed samples. Shards cut off after
preparation (copied or synced partially) would stop energon's reader, so
they are found here: in a folder they can be left out through an extra split
config next to split.yaml (exclude_shards); in a metadataset they are refused.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import yaml

from megavl.config import Config, ConfigError, check_resolution_override


# ---------------------------------------------------------------- per-dataset settings


def _metadataset_entries(path: Path) -> Iterator[tuple[str, str, dict, Path]]:
    """(where, split, entry, the entry's path) for every dataset entry of a metadataset
    YAML and of the metadatasets it includes."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"data path {str(path)!r}: cannot read the metadataset: {e}") from None
    for split, spec in ((meta or {}).get("splits") or {}).items():
        spec = spec or {}
        entries = spec.get("blend") or spec.get("blend_epochized") or ([spec] if "path" in spec else [])
        for i, entry in enumerate(entries):
            inner = path.parent / str(entry.get("path", ""))
            yield f"{path}: splits.{split}.blend[{i}] ({entry.get('path')})", split, entry, inner
            if inner.suffix in (".yaml", ".yml") and inner.is_file():
                yield from _metadataset_entries(inner)


def check_metadataset(path: str | os.PathLike, config: Config) -> None:
    """Checks the per-dataset settings of a metadataset YAML (and the ones it
    includes) before any worker starts, so a typo fails at once with the
    dataset's name instead of as failed samples."""
    path = Path(path)
    if path.is_dir():
        return
    problems: list[str] = []
    for where, _, entry, _ in _metadataset_entries(path):
        override = (entry.get("subflavors") or {}).get("resolution")
        if override is not None:
            problems += check_resolution_override(override, config, where)
    if problems:
        raise ConfigError("invalid dataset settings:\n  " + "\n  ".join(problems))


def check_split_part(path: Path, split: str) -> None:
    """A dataset folder must be energon-prepared and hold the split part asked for."""
    if not path.is_dir():
        return  # a metadataset: energon names a missing split itself
    split_file = path / ".nv-meta" / "split.yaml"
    if not split_file.is_file():
        raise ValueError(
            f"data path {str(path)!r} is not a prepared dataset (no .nv-meta/split.yaml); write it with "
            f"tools/prepare_data.py, or run `energon prepare` on existing WebDataset shards"
        )
    with open(split_file, encoding="utf-8") as f:
        parts = sorted((yaml.safe_load(f) or {}).get("split_parts") or {})
    if split not in parts:
        raise ValueError(
            f"data path {str(path)!r} has split parts {parts} but the loader needs {split!r} "
            f"(training reads 'train', evaluation 'val'; tools/prepare_data.py --split names it)"
        )


# ---------------------------------------------------------------- truncated shards


@dataclass
class TruncatedShard:
    name: str
    samples: int  # in the index
    cut_off: int  # samples (partly) beyond the end of the file
    size: int
    expected: int

    def describe(self, folder: Path) -> str:
        return (f"{folder / self.name}: {self.size} bytes but the index expects {self.expected}; "
                f"{self.cut_off} of {self.samples} samples cut off")


def _split_parts(dataset_dir: Path, split_config: str = "split.yaml") -> dict:
    with open(dataset_dir / ".nv-meta" / split_config, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def truncated_shards(dataset_dir: Path, split: str) -> list[TruncatedShard]:
    """Shards of a prepared folder shorter than energon's index says (copied or
    synced partially after preparation)."""
    patterns = (_split_parts(dataset_dir).get("split_parts") or {}).get(split) or []
    found = []
    for shard in (name for pattern in patterns for name in braceexpand.braceexpand(pattern)):
        tar, index = dataset_dir / shard, dataset_dir / (shard + ".idx")
        if not tar.is_file() or not index.is_file():
            raise ValueError(f"{tar}: listed in .nv-meta/split.yaml but missing (or its .idx index is); "
                             f"restore it or re-run tools/prepare_data.py")
        data = index.read_bytes()
        # The index holds every sample's start offset and then the end of the last one.
        offsets = struct.unpack(f"<{len(data) // 8}Q", data)
        size = tar.stat().st_size
        if offsets and size < offsets[-1]:
            cut_off = sum(1 for end in offsets[1:] if end > size)
            found.append(TruncatedShard(shard, len(offsets) - 1, cut_off, size, offsets[-1]))
    return found


# Written next to split.yaml when shards must be left out; split.yaml itself is never changed.
EXCLUDING_SPLIT_CONFIG = "split.megavl-excluding-truncated.yaml"


def exclude_shards(dataset_dir: Path, shards: list[TruncatedShard]) -> str:
    """A split config that leaves the shards out (energon's `exclude`); returns its file name."""
    parts = _split_parts(dataset_dir)
    parts["exclude"] = sorted(set(parts.get("exclude") or []) | {s.name for s in shards})
    target = dataset_dir / ".nv-meta" / EXCLUDING_SPLIT_CONFIG
    temporary = target.with_name(target.name + f".{os.getpid()}.tmp")
    temporary.write_text(yaml.safe_dump(parts, sort_keys=False), encoding="utf-8")
    os.replace(temporary, target)
    return EXCLUDING_SPLIT_CONFIG


def check_metadataset_shards(path: Path, split: str) -> None:
    """A metadataset's local datasets must have whole shards: energon's reader would stop
    the run at a cut-off one, and a metadataset's datasets cannot be re-split from here."""
    problems = []
    for folder in _metadataset_folders(path, split):
        problems += [shard.describe(folder) for shard in truncated_shards(folder, split)]
    if problems:
        raise ValueError(
            "truncated shards (restore the files or re-run tools/prepare_data.py; to train without them, "
            "list them under `exclude:` in the dataset's .nv-meta/split.yaml):\n  " + "\n  ".join(problems)
        )


def _metadataset_folders(path: Path, split: str) -> list[Path]:
    return [inner for _, entry_split, _, inner in _metadataset_entries(path)
            if entry_split == split and (inner / ".nv-meta" / "split.yaml").is_file()]
