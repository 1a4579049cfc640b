"""Greedy packing of variable-length samples into fixed-length rows."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

from megavl.data.batch import Sample

logger = logging.getLogger(__name__)

# Counters that states saved by earlier versions do not have; they load as zero.
_COUNTERS_ADDED_LATER = ("dropped_too_many_vision_tokens", "vision_tokens")


@dataclass
class PackingStats:
    packs: int = 0
    samples: int = 0
    real_tokens: int = 0
    dropped_too_long: int = 0
    dropped_too_many_images: int = 0
    seq_length: int = 0
    dropped_too_many_vision_tokens: int = 0
    vision_tokens: int = 0  # in the emitted packs

    @property
    def padded_tokens(self) -> int:
        """Token slots the emitted packs occupy, padding included."""
        return self.packs * self.seq_length

    @property
    def efficiency(self) -> float:
        """Fraction of emitted token slots holding real tokens (0 before any pack)."""
        total = self.padded_tokens
        return self.real_tokens / total if total else 0.0

    @property
    def vision_tokens_per_pack(self) -> float:
        """Mean vision tokens of an emitted pack (0 before any pack)."""
        return self.vision_tokens / self.packs if self.packs else 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
            elif f.name in _COUNTERS_ADDED_LATER:
                setattr(self, f.name, f.default)
            else:
                raise ValueError(f"packing stats state has no {f.name!r}; it holds {sorted(state)}")


def sample_vision_tokens(sample: Sample, spatial_merge_size: int) -> int:
    """LM tokens the sample's images become after the spatial merge."""
    return sum(image.num_tokens(spatial_merge_size) for image in sample.images)


class _Pack:
    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.tokens = 0
        self.images = 0
        self.vision_tokens = 0

    def add(self, sample: Sample, vision_tokens: int) -> None:
        self.samples.append(sample)
        self.tokens += len(sample)
        self.images += len(sample.images)
        self.vision_tokens += vision_tokens


class GreedyPacker:
    """First-fit packing under a token budget, an image budget and an optional
    vision-token budget per pack.

    Emission policy (everything is a function of the order samples arrive
    in, so the packs are deterministic):

    * ``add`` places the sample in the first open pack, in the order the
      packs were opened, that has room for its tokens, its images and its
      vision tokens, or opens a new pack at the end of that order.
    * A pack whose tokens reach exactly ``seq_length`` can take nothing more
      and is emitted at once.
    * While more than ``buffer_size`` packs are open, the fullest (most
      tokens; the earliest opened among equals) is emitted.
    * ``flush`` emits every open pack, in opening order.

    A sample's vision tokens are what its images become after the spatial
    merge (``ImagePatches.num_tokens(spatial_merge_size)``), the same count
    ``pack_row`` checks against the image-pad tokens. The vision budget
    ``max_vision_tokens_per_pack`` bounds the vision encoder's work and
    memory per pack: under the token budget alone a pack may be almost all
    image tokens, each of which costs the encoder several patches. 0 turns
    it off.

    Samples keep their arrival order inside a pack. A sample that can never
    fit (more tokens than ``seq_length``, more images than
    ``max_images_per_pack`` or more vision tokens than a nonzero
    ``max_vision_tokens_per_pack``) is dropped, counted and logged with its key.

    Memory: up to ``buffer_size`` packs of decoded images are held, roughly
    ``buffer_size * seq_length`` tokens' worth of pixels in the worst case.
    """

    def __init__(
        self,
        seq_length: int,
        max_images_per_pack: int,
        buffer_size: int = 64,
        *,
        max_vision_tokens_per_pack: int = 0,
        spatial_merge_size: int = 2,
    ):
        if seq_length < 1 or max_images_per_pack < 0 or buffer_size < 1:
            raise ValueError(
                f"GreedyPacker needs seq_length >= 1, max_images_per_pack >= 0 and buffer_size >= 1; got "
                f"{seq_length}, {max_images_per_pack}, {buffer_size}"
            )
        if max_vision_tokens_per_pack < 0:
            raise ValueError(
                f"GreedyPacker max_vision_tokens_per_pack = {max_vision_tokens_per_pack}: must be >= 0 "
                "(0 means no vision-token budget)"
            )
        if spatial_merge_size < 1:
            raise ValueError(f"GreedyPacker spatial_merge_size = {spatial_merge_size}: must be >= 1")
        self.seq_length = seq_length
        self.max_images_per_pack = max_images_per_pack
        self.buffer_size = buffer_size
        self.max_vision_tokens_per_pack = max_vision_tokens_per_pack
        self.spatial_merge_size = spatial_merge_size
        self.stats = PackingStats(seq_length=seq_length)
        self._open: list[_Pack] = []

    def vision_tokens(self, samples: Sequence[Sample]) -> int:
        """Vision tokens of a pack (or any samples), counted as the budget counts them."""
        return sum(sample_vision_tokens(s, self.spatial_merge_size) for s in samples)

    def add(self, sample: Sample) -> list[list[Sample]]:
        """Takes one sample; returns the packs this completes (often none)."""
        vision_tokens = sample_vision_tokens(sample, self.spatial_merge_size)
        if not self._can_ever_fit(sample, vision_tokens):
            return []
        target = next((p for p in self._open if self._fits(p, sample, vision_tokens)), None)
        if target is None:
            target = _Pack()
            self._open.append(target)
        target.add(sample, vision_tokens)
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
                pack.add(sample, sample_vision_tokens(sample, self.spatial_merge_size))
            self._open.append(pack)

    def _can_ever_fit(self, sample: Sample, vision_tokens: int) -> bool:
        """False (after counting and logging the drop) when even an empty pack cannot take the sample."""
        if len(sample) > self.seq_length:
            self.stats.dropped_too_long += 1
            logger.warning(
                "dropping sample %r: %d tokens do not fit seq_length=%d", sample.key, len(sample), self.seq_length
            )
            return False
        if len(sample.images) > self.max_images_per_pack:
            self.stats.dropped_too_many_images += 1
            logger.warning(
                "dropping sample %r: %d images exceed max_images_per_pack=%d",
                sample.key, len(sample.images), self.max_images_per_pack,
            )
            return False
        if self.max_vision_tokens_per_pack and vision_tokens > self.max_vision_tokens_per_pack:
            self.stats.dropped_too_many_vision_tokens += 1
            logger.warning(
                "dropping sample %r: %d vision tokens exceed max_vision_tokens_per_pack=%d",
                sample.key, vision_tokens, self.max_vision_tokens_per_pack,
            )
            return False
        return True

    def _fits(self, pack: _Pack, sample: Sample, vision_tokens: int) -> bool:
        return (
            pack.tokens + len(sample) <= self.seq_length
            and pack.images + len(sample.images) <= self.max_images_per_pack
            and (
                not self.max_vision_tokens_per_pack
                or pack.vision_tokens + vision_tokens <= self.max_vision_tokens_per_pack
            )
        )

    def _emit(self, pack: _Pack) -> list[Sample]:
        self.stats.packs += 1
        self.stats.samples += len(pack.samples)
        self.stats.real_tokens += pack.tokens
        self.stats.vision_tokens += pack.vision_tokens
        return pack.samples
