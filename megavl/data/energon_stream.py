"""The training data loader: megatron-energon datasets -> packed, collated microbatches.

``data.train_path`` / ``data.val_path`` name a prepared dataset (a folder of
WebDataset shards with energon's ``.nv-meta``, written by
tools/prepare_data.py or tools/make_synthetic_data.py) or a metadataset YAML
that blends several, with weights and per-dataset settings::

    __module__: megatron.energon
    __class__: MetadatasetV2
    splits:
      train:
        blend:
          - weight: 3
            path: ./captions
          - weight: 1
            path: ./documents
            subflavors:
              name: documents                      # shown in metrics (default: folder name)
              resolution: {mode: tiling, max_tiles: 9}

Energon does the reading, shuffling, blending, sharding over data-parallel
ranks and worker processes, and the exact save/restore of all of it. megavl's
task encoder (task_encoder.py, running in the workers) turns each record into a
Sample (records.py: image back end, resolution policy, chat encoding), packs a
buffer of samples under the token and vision budgets, and collates
``train.micro_batch_size`` packs into a microbatch.

Bad data. A record that cannot be used, or does not fit any pack, travels on
as a failure inside the next microbatch instead of being dropped in the
worker, so the training process counts every failure per dataset and reason,
logs it with its key, and the counts are restored exactly with the loader.
Reasons: records.RECORD_SKIP_REASONS plus ``too_long``, ``too_many_images``,
``too_many_vision_tokens``, ``decode_error`` (anything else raised while
encoding a record) and ``truncated_shard``: energon's reader would stop the
loader at a tar cut off after preparation, so such shards of a dataset folder
are found at start-up and left out whole (through an extra split config next
to split.yaml), their samples counted; in a metadataset they are refused with
the list. A dataset whose failure rate exceeds
``data.max_failure_rate`` after ``data.failure_check_min_samples`` of its
records stops the run (check_failure_rates).

Resume. ``state_dict`` holds energon's state for this rank and the counters.
Restoring needs the same datasets, data-parallel rank and size and
``data.num_workers`` (energon splits shards over the global set of workers, so
another worker count reads another order, and such a state is refused).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import braceexpand
import yaml

from megavl.config import Config, ConfigError, check_resolution_override
from megavl.data.task_encoder import energon, make_task_encoder

logger = logging.getLogger(__name__)
# Energon asks torch's DataLoader to pin memory, which warns on machines without an accelerator.
warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator.*")

_STATE_FORMAT = 2


class DataFailureRateError(RuntimeError):
    """A dataset fails too often to be worth training on."""


# ---------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------


@dataclass
class DataStats:
    """What this rank's stream has delivered; restored with the stream."""

    microbatches: int = 0
    rows: int = 0
    real_tokens: int = 0
    vision_tokens: int = 0
    seq_length: int = 0
    # dataset name -> records read / reason -> failures
    read: dict[str, int] = field(default_factory=dict)
    failed: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def packing_efficiency(self) -> float:
        slots = self.rows * self.seq_length
        return self.real_tokens / slots if slots else 0.0

    @property
    def skipped(self) -> dict[str, int]:
        """Failures by reason over all datasets."""
        totals: dict[str, int] = {}
        for reasons in self.failed.values():
            for reason, n in reasons.items():
                totals[reason] = totals.get(reason, 0) + n
        return totals

    def add(self, batch_stats: dict) -> None:
        self.microbatches += 1
        self.rows += batch_stats["rows"]
        self.real_tokens += batch_stats["real_tokens"]
        self.vision_tokens += batch_stats["vision_tokens"]
        self.add_counts(batch_stats["read"], batch_stats["failed"])

    def add_counts(self, read: dict[str, int], failed: dict[str, dict[str, int]]) -> None:
        """Records read and failed per dataset (and reason), e.g. another rank's."""
        for name, n in read.items():
            self.read[name] = self.read.get(name, 0) + n
        for name, reasons in failed.items():
            for reason, n in reasons.items():
                self._count_failed(name, reason, n)

    def count_skipped(self, dataset: str, reason: str, n: int) -> None:
        """n records of dataset that were never read into a microbatch."""
        self.read[dataset] = self.read.get(dataset, 0) + n
        self._count_failed(dataset, reason, n)

    def _count_failed(self, dataset: str, reason: str, n: int) -> None:
        reasons = self.failed.setdefault(dataset, {})
        reasons[reason] = reasons.get(reason, 0) + n

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def check_failure_rates(read: dict[str, int], failed: dict[str, dict[str, int]], config: Config) -> None:
    """Raises DataFailureRateError for the first dataset failing above data.max_failure_rate."""
    d = config.data
    for name in sorted(read):
        n = read[name]
        bad = sum(failed.get(name, {}).values())
        if n >= d.failure_check_min_samples and bad > d.max_failure_rate * n:
            reasons = ", ".join(f"{r}: {c}" for r, c in sorted(failed[name].items()))
            raise DataFailureRateError(
                f"dataset {name!r}: {bad} of {n} records failed ({bad / n:.1%}), above "
                f"data.max_failure_rate = {d.max_failure_rate:.1%} ({reasons}); fix or remove the dataset "
                f"(the failed keys are in the log), or raise data.max_failure_rate"
            )


# ---------------------------------------------------------------------------
# Per-dataset settings
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The stream the trainer iterates
# ---------------------------------------------------------------------------


class EnergonDataStream:
    """Microbatches for one data-parallel rank (``rank`` of ``world_size``).

    split "train" repeats forever (shuffled, blended); any other split makes
    one pass in order and then stops. ``max_pixels`` caps native resolution
    (the progressive schedule); set_max_pixels changes it in place of a
    running stream without losing or repeating data.
    """

    def __init__(self, path, tokenizer, config: Config, rank: int, world_size: int, seed: int,
                 split: str = "train", max_pixels: Optional[int] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        # Object storage (energon's multi-storage-client URLs, e.g. msc://profile/bucket/data)
        # is handed to energon as it is; the local checks below need a file system.
        self.path = str(path) if "://" in str(path) else Path(path)
        self.split_config: Optional[str] = None
        self.skipped_shards: list[TruncatedShard] = []
        if isinstance(self.path, Path):
            self._check_local(split, config)
        self.tokenizer = tokenizer
        self.config = config
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.split = split
        self.max_pixels = max_pixels
        self.stats = DataStats(seq_length=config.train.seq_length)
        self._count_skipped_shards()
        self._loader = self._build()
        self._iterator = None
        # The energon state last restored, for a rebuild before the first batch.
        self._restored: Optional[Any] = None

    def _check_local(self, split: str, config: Config) -> None:
        if not self.path.exists():
            raise FileNotFoundError(f"data path {str(self.path)!r} does not exist")
        check_split_part(self.path, split)
        check_metadataset(self.path, config)
        if not self.path.is_dir():
            check_metadataset_shards(self.path, split)
            return
        # Energon's reader stops the whole loader at a cut-off tar, so such shards are
        # found up front, left out, and their samples counted as skipped.
        truncated = truncated_shards(self.path, split)
        if truncated:
            try:
                self.split_config = exclude_shards(self.path, truncated)
            except OSError as e:
                raise ValueError(
                    f"truncated shards, which cannot be left out because .nv-meta is not writable ({e}); restore "
                    "them or list them under `exclude:` in .nv-meta/split.yaml:\n  "
                    + "\n  ".join(shard.describe(self.path) for shard in truncated)
                ) from None
            for shard in truncated:
                logger.warning("skipping truncated shard %s (all %d samples)", shard.describe(self.path),
                               shard.samples)
            self.skipped_shards = truncated

    def _count_skipped_shards(self) -> None:
        for shard in self.skipped_shards:
            self.stats.count_skipped(self.path.name, "truncated_shard", shard.samples)

    def _build(self):
        d = self.config.data
        worker_config = energon().WorkerConfig(rank=self.rank, world_size=self.world_size,
                                             num_workers=d.num_workers, seed_offset=self.seed)
        encoder = make_task_encoder(self.config, self.tokenizer, self.seed, self.max_pixels)
        common = dict(worker_config=worker_config, batch_size=self.config.train.micro_batch_size,
                      packing_buffer_size=d.packing_buffer_size, task_encoder=encoder)
        if self.split_config:
            common["split_config"] = self.split_config
        if self.split == "train":
            dataset = energon().get_train_dataset(
                self.path, split_part="train", shuffle_buffer_size=d.shuffle_buffer_size,
                max_samples_per_sequence=d.max_samples_per_sequence, **common)
        else:
            dataset = energon().get_val_dataset(self.path, split_part=self.split, **common)
        return energon().get_savable_loader(dataset, watchdog_timeout_seconds=None)

    def __iter__(self) -> "EnergonDataStream":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        stats = batch.pop("data_stats")
        batch.pop("__restore_key__", None)
        for name, key, reason, detail in stats["failures"]:
            logger.warning("skipped sample %r of dataset %r: %s (%s)", key, name, reason, detail)
        self.stats.add(stats)
        batch["vision_tokens"] = stats["vision_tokens"]
        return batch

    def set_max_pixels(self, max_pixels: Optional[int]) -> None:
        """Rebuilds the loader with another cap, continuing from the same position."""
        if max_pixels == self.max_pixels:
            return
        state = self._loader.save_state_rank() if self._iterator is not None else self._restored
        self.close()
        self.max_pixels = max_pixels
        self._loader = self._build()
        if state is not None:
            self._loader.restore_state_rank(state)

    def close(self) -> None:
        self._iterator = None
        shutdown = getattr(self._loader, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.config.data.num_workers,
            "energon": self._loader.save_state_rank(),
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"data stream state has format {state.get('format')!r}, expected {_STATE_FORMAT} "
                "(a checkpoint written before the energon loader cannot resume its data position)"
            )
        for name, mine in (("rank", self.rank), ("world_size", self.world_size),
                           ("num_workers", self.config.data.num_workers)):
            if state[name] != mine:
                raise ValueError(
                    f"data stream state was saved with {name} = {state[name]} but this run has {mine}; "
                    "energon resumes only under the same data-parallel rank, size and data.num_workers"
                )
        self._iterator = None
        self._restored = state["energon"]
        self._loader.restore_state_rank(state["energon"])
        self.stats.load_state_dict(state["stats"])
