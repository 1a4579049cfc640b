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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from megavl.config import Config
from megavl.data.dataset_checks import (
    TruncatedShard,
    check_metadataset,
    check_metadataset_shards,
    check_split_part,
    exclude_shards,
    truncated_shards,
)
from megavl.data.task_encoder import energon, make_task_encoder
from megavl.data.trainer_decode import decode_place

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

    def count_failed(self, dataset: str, reason: str, n: int = 1) -> None:
        """n records of dataset, already counted as read, that failed afterwards."""
        self._count_failed(dataset, reason, n)

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
        # Microbatches then carry encoded images for trainer_decode.TrainerImageDecoder.
        self.decode_in_trainer = decode_place(config) == "trainer"
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
        encoder = make_task_encoder(self.config, self.tokenizer, self.seed, self.max_pixels, self.decode_in_trainer)
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
            # Starting the loader (its first batch) draws a base seed from torch's global
            # generator. Forked, so that draw does not shift dropout: a resumed run, which starts
            # its loader after restoring the RNG state, then draws the uninterrupted run's masks.
            with torch.random.fork_rng(devices=[]):
                self._iterator = iter(self._loader)
                batch = next(self._iterator)
        else:
            batch = next(self._iterator)
        stats = batch.pop("data_stats")
        batch.pop("__restore_key__", None)
        _log_failures(stats["failures"])
        self.stats.add(stats)
        batch["vision_tokens"] = stats["vision_tokens"]
        return batch

    def record_failures(self, failures: list[tuple[str, str, str, str]]) -> None:
        """Counts and logs (dataset, key, reason, detail) failures found after the loader, in
        records this stream already delivered (trainer_decode.py)."""
        _log_failures(failures)
        for name, _, reason, _ in failures:
            self.stats.count_failed(name, reason)

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


def _log_failures(failures) -> None:
    for name, key, reason, detail in failures:
        logger.warning("skipped sample %r of dataset %r: %s (%s)", key, name, reason, detail)
