"""Greedy packing of variable-length samples into fixed-length rows."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

from megavl.data.batch import Sample

logger = logging.getLogger(__name__)


@dataclass
class PackingStats:
    packs: int = 0
    samples: int = 0
    real_tokens: int = 0
    dropped_too_long: int = 0
    dropped_too_many_images: int = 0
    seq_length: int = 0

    @property
    def padded_tokens(self) -> int:
        """Token slots the emitted packs occupy, padding included."""
        return self.packs * self.seq_length

    @property
    def efficiency(self) -> float:
        """Fraction of emitted token slots holding real tokens (0 before any pack)."""
        total = self.padded_tokens
        return self.real_tokens / total if total else 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


class _Pack:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.tokens = 0
        self.images = 0

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        self.tokens += len(sample)
        self.images += len(sample.images)


class GreedyPacker:
    """First-fit packing under a token budget and an image budget per pack.

    Emission policy (everything is a function of the order samples arrive
    in, so the packs are deterministic):

    * ``add`` places the sample in the first open pack, in the order the
      packs were opened, that has room for both its tokens and its images,
      or opens a new pack at the end of that order.
    * A pack whose tokens reach exactly ``seq_length`` can take nothing more
      and is emitted at once.
    * While more than ``buffer_size`` packs are open, the fullest (most
      tokens; the earliest opened among equals) is emitted.
    * ``flush`` emits every open pack, in opening order.

    Samples keep their arrival order inside a pack. A sample that can never
    fit (more tokens than ``seq_length`` or more images than
    ``max_images_per_pack``) is dropped, counted and logged with its key.

    Memory: up to ``buffer_size`` packs of decoded images are held, roughly
    ``buffer_size * seq_length`` tokens' worth of pixels in the worst case.
    """

    def __init__(self, seq_length: int, max_images_per_pack: int, buffer_size: int = 64):
        if seq_length < 1 or max_images_per_pack < 0 or buffer_size < 1:
            raise ValueError(
                f"GreedyPacker needs seq_length >= 1, max_images_per_pack >= 0 and buffer_size >= 1; got "
                f"{seq_length}, {max_images_per_pack}, {buffer_size}"
            )
        self.seq_length = seq_length
        self.max_images_per_pack = max_images_per_pack
        self.buffer_size = buffer_size
        self.stats = PackingStats(seq_length=seq_length)
        self._open: list[_Pack] = []

    def add(self, sample: Sample) -> list[list[Sample]]:
        """Takes one sample; returns the packs this completes (often none)."""
        if len(sample) > self.seq_length:
            self.stats.dropped_too_long += 1
            logger.warning(
                "dropping sample %r: %d tokens do not fit seq_length=%d", sample.key, len(sample), self.seq_length
            )
            return []
        if len(sample.images) > self.max_images_per_pack:
            self.stats.dropped_too_many_images += 1
            logger.warning(
                "dropping sample %r: %d images exceed max_images_per_pack=%d",
                sample.key, len(sample.images), self.max_images_per_pack,
            )
            return []
        target = next((p for p in self._open if self._fits(p, sample)), None)
        if target is None:
            target = _Pack()
            self._open.append(target)
        target.add(sample)
        done = []
        if target.tokens == self.seq_length:
            self._open.remove(target)
            done.append(self._emit(target))
        while len(self._open) > self.buffer_size:
            # max() keeps the first of equals, i.e. the earliest opened.
            fullest = max(self._open, key=lambda p: p.tokens)
            self._open.remove(fullest)
            done.append(self._emit(fullest))
        return done

    def flush(self) -> list[list[Sample]]:
        """Emits every open pack, in the order they were opened."""
        done = [self._emit(p) for p in self._open]
        self._open = []
        return done

    def pending(self) -> list[list[Sample]]:
        """The open packs, in opening order (for checkpointing the packer)."""
        return [list(p.samples) for p in self._open]

    def load_pending(self, packs: Sequence[Sequence[Sample]]) -> None:
        """Replaces the open packs with ``packs``, as returned by ``pending``."""
        self._open = []
        for samples in packs:
            pack = _Pack()
            for sample in samples:
                pack.add(sample)
            self._open.append(pack)

    def _fits(self, pack: _Pack, sample: Sample) -> bool:
        return (
            pack.tokens + len(sample) <= self.seq_length
            and pack.images + len(sample.images) <= self.max_images_per_pack
        )

    def _emit(self, pack: _Pack) -> list[Sample]:
        self.stats.packs += 1
        self.stats.samples += len(pack.samples)
        self.stats.real_tokens += pack.tokens
        return pack.samples
