"""WebDataset tar shards -> packed, collated microbatches, with exact resume.

Shards are read with the standard library's ``tarfile`` rather than the
``webdataset`` package (which is only one way of writing them; the layout is
plain tar, members ``<key>.<ext>`` grouped by key). Two things this stream
needs are hidden by webdataset's iterators: the byte offset of every
record, which lets a resume re-read just the few records that were in
flight instead of replaying the epoch, and whether a shard ended with a
proper end-of-archive marker, which is how a truncated shard is told apart
from a complete one.

Order. Per epoch the shard list (sorted by name) is shuffled with a
generator seeded by (seed, epoch) when ``shuffle`` is set; records follow in
shard order and record i of the epoch goes to data-parallel rank
``i % world_size``. Every rank scans every tar header (cheap: member data is
skipped by seeking), but reads and decodes only its own records.

Bad data never stops training: a record that cannot be used is skipped,
counted in ``stats.skipped[reason]`` and logged with its key. Reasons:
``missing_json``, ``bad_json``, ``invalid_record`` (malformed conversation,
placeholder/image mismatch, encoder errors), ``missing_image``,
``bad_image`` (corrupt, truncated or oversized image bytes),
``unreadable_member``, ``truncated_shard`` (the rest of that shard is skipped;
the record being read when the shard broke off is dropped, since it may be
missing members) and ``unreadable_shard``.

End of data. An infinite stream starts the next epoch after the last record
and carries partly filled packs over, so nothing is lost at the boundary.
A finite stream (validation) makes one pass, then flushes the packer; the
last microbatch is padded out with all-padding rows (document id -1, no
loss) so that every sample is evaluated, and then StopIteration follows.
Ranks may get different numbers of microbatches in a finite pass, so an
evaluation loop that runs collectives should take a fixed number of steps.

Resume. ``state_dict`` records the read cursor (epoch, shard, byte offset,
record index), the records sitting in open packs and in packs waiting for a
microbatch (as shard name + byte offset), and the counters.
``load_state_dict`` re-reads and re-encodes only those in-flight records,
at most ``pack_buffer_size`` packs' worth, and continues from the cursor, so
the cost of a resume does not grow with the position in the epoch. The
state is per rank and requires the same shards, seed, rank, world size and
shuffle setting.

Decoding runs in the calling process; ``config.data.num_workers`` is not
used by this stream.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megavl.config import Config
from megavl.data.batch import Sample, collate_rows, pack_row
from megavl.data.conversation import SampleEncoder, count_image_placeholders, pad_token_id
from megavl.data.images import decode_image, image_to_model_input
from megavl.data.packing import GreedyPacker, PackingStats

logger = logging.getLogger(__name__)

_STATE_FORMAT = 1
_END_OF_ARCHIVE = b"\0" * tarfile.BLOCKSIZE
# webdataset's convention: the key is everything up to the first dot of the
# file name, the extension everything after it.
_MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")
_IMAGE_MEMBER = re.compile(r"^img(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)


@dataclass
class StreamStats:
    samples_read: int = 0  # records of this rank whose data was read
    samples_used: int = 0  # records that became samples and went to the packer
    microbatches: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    packing: PackingStats = field(default_factory=PackingStats)

    @property
    def packing_efficiency(self) -> float:
        return self.packing.efficiency

    def state_dict(self) -> dict:
        return {
            "samples_read": self.samples_read,
            "samples_used": self.samples_used,
            "microbatches": self.microbatches,
            "skipped": dict(self.skipped),
            "packing": self.packing.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.samples_read = state["samples_read"]
        self.samples_used = state["samples_used"]
        self.microbatches = state["microbatches"]
        self.skipped = dict(state["skipped"])
        self.packing.load_state_dict(state["packing"])


@dataclass
class _SourcedSample(Sample):
    # (shard name, byte offset of the record's first tar header), enough to
    # read the record again when restoring a checkpointed stream.
    source: tuple[str, int] = ("", 0)


@dataclass
class _Record:
    key: str
    offset: int
    members: dict[str, tarfile.TarInfo]  # extension -> member


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _TruncatedShard(Exception):
    pass


class _ShardReader:
    """Complete records of one shard, starting at a record boundary."""

    def __init__(self, path: Path, offset: int = 0):
        self.path = path
        self._file = open(path, "rb")  # OSError here means an unreadable shard
        self._file.seek(offset)
        self._tar: Optional[tarfile.TarFile] = None

    def records(self) -> Iterator[tuple[_Record, int]]:
        """Yields (record, offset of the record after it).

        A record is only complete once a member with another key, or a clean
        end of archive, follows it. Raises _TruncatedShard when the archive
        breaks off (short data, damaged header, no end marker); the record
        in progress at that point is not yielded.
        """
        try:
            self._tar = tarfile.open(fileobj=self._file, mode="r:")
        except tarfile.TarError as e:
            raise _TruncatedShard(str(e)) from None
        current: Optional[_Record] = None
        while True:
            try:
                info = self._tar.next()
            except tarfile.TarError as e:
                raise _TruncatedShard(str(e)) from None
            if info is None:
                break
            if not info.isfile():
                continue
            match = _MEMBER_NAME.match(info.name)
            if match is None:
                continue
            key, ext = match.groups()
            if current is not None and key == current.key:
                current.members[ext] = info
                continue
            if current is not None:
                yield current, info.offset
            current = _Record(key, info.offset, {ext: info})
        # tarfile stops quietly at a short or damaged header; only the
        # end-of-archive zero block proves the shard is complete.
        self._file.seek(self._tar.offset)
        if self._file.read(tarfile.BLOCKSIZE) != _END_OF_ARCHIVE:
            raise _TruncatedShard(f"no end-of-archive marker at byte {self._tar.offset}")
        if current is not None:
            yield current, self._tar.offset

    def read(self, info: tarfile.TarInfo) -> bytes:
        try:
            member = self._tar.extractfile(info)
            return member.read()
        except (tarfile.TarError, OSError) as e:
            raise _Skip("unreadable_member", f"{info.name}: {e}") from None

    def close(self) -> None:
        self._file.close()


def list_shards(path: str | os.PathLike) -> list[str]:
    """The ``*.tar`` file names in directory ``path``, sorted."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"data path {str(directory)!r} is not a directory of .tar shards")
    shards = sorted(p.name for p in directory.iterdir() if p.suffix == ".tar" and p.is_file())
    if not shards:
        raise ValueError(f"data path {str(directory)!r} holds no .tar shards")
    return shards


def count_answer_tokens(batch: dict) -> int:
    """Tokens of a microbatch that carry a loss (answer tokens and their closing <|im_end|>)."""
    return int(batch["loss_mask"].sum())


class PackedDataStream:
    """Iterator of collated microbatches for one data-parallel rank.

    Each microbatch is ``collate_rows`` of ``config.train.micro_batch_size``
    rows of ``config.train.seq_length`` tokens, packed greedily (see
    GreedyPacker). ``rank`` and ``world_size`` are the data-parallel rank and
    size. See the module docstring for order, bad-data, end-of-data and
    resume behaviour.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer,
        config: Config,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        infinite: bool = True,
        pack_buffer_size: int = 64,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.directory = Path(path)
        self.shards = list_shards(path)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.encoder = SampleEncoder(tokenizer, config, seed)
        self.image_token_id = self.encoder.image_pad
        self.pad_token_id = pad_token_id(tokenizer)
        self.merge = config.model.vision.spatial_merge_size
        self.packer = GreedyPacker(config.train.seq_length, config.data.max_images_per_pack, pack_buffer_size)
        self.stats = StreamStats(packing=self.packer.stats)
        self._ready: collections.deque[list[Sample]] = collections.deque()
        self._reset_cursor(epoch=0)
        self._exhausted = False

    # -- iteration ---------------------------------------------------------

    def __iter__(self) -> "PackedDataStream":
        return self

    def close(self) -> None:
        """Closes the shard being read; iterating again reopens it at the cursor."""
        self._close_reader()

    def __next__(self) -> dict:
        size = self.config.train.micro_batch_size
        while len(self._ready) < size and not self._exhausted:
            if not self._step():
                self._ready.extend(self.packer.flush())
                self._exhausted = True
        if not self._ready:
            raise StopIteration
        packs = [self._ready.popleft() for _ in range(min(size, len(self._ready)))]
        rows = [self._row(pack) for pack in packs]
        rows += [self._row([]) for _ in range(size - len(rows))]
        self.stats.microbatches += 1
        return collate_rows(rows)

    def _row(self, samples: Sequence[Sample]) -> dict:
        return pack_row(samples, self.config.train.seq_length, self.image_token_id, self.merge, self.pad_token_id)

    def epoch_order(self, epoch: int) -> list[str]:
        """The shard names in the order epoch ``epoch`` reads them."""
        order = list(self.shards)
        if self.shuffle:
            # Seeding from a str goes through SHA-512: the same order on every
            # rank and in every run, whatever PYTHONHASHSEED is.
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _reset_cursor(self, epoch: int) -> None:
        self._epoch = epoch
        self._order = self.epoch_order(epoch)
        self._shard_pos = 0
        self._offset = 0
        self._record_index = 0
        self._used_this_epoch = 0
        self._close_reader()

    def _close_reader(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
        self._reader: Optional[_ShardReader] = None
        self._records: Optional[Iterator[tuple[_Record, int]]] = None

    def _next_shard(self) -> None:
        self._close_reader()
        self._shard_pos += 1
        self._offset = 0

    def _step(self) -> bool:
        """Moves the read cursor by one record (or shard); False once a finite pass is over."""
        if self._shard_pos >= len(self._order):
            if not self.infinite:
                return False
            if self._used_this_epoch == 0:
                raise RuntimeError(
                    f"a whole epoch of {self.directory} gave rank {self.rank} of {self.world_size} "
                    "no usable sample; see the warnings above"
                )
            self._reset_cursor(self._epoch + 1)
        shard = self._order[self._shard_pos]
        if self._reader is None:
            try:
                self._reader = _ShardReader(self.directory / shard, self._offset)
            except OSError as e:
                self._count_skip("unreadable_shard")
                logger.warning("skipping shard %s: %s", self.directory / shard, e)
                self._next_shard()
                return True
            self._records = self._reader.records()
        try:
            record, next_offset = next(self._records)
        except StopIteration:
            self._next_shard()
            return True
        except _TruncatedShard as e:
            self._count_skip("truncated_shard")
            logger.warning("skipping the rest of truncated shard %s: %s", self.directory / shard, e)
            self._next_shard()
            return True
        index = self._record_index
        self._record_index += 1
        self._offset = next_offset
        if index % self.world_size != self.rank:
            return True
        self.stats.samples_read += 1
        try:
            sample = self._load(record, self._reader, shard)
        except _Skip as skip:
            self._count_skip(skip.reason)
            logger.warning("skipping sample %r in %s: %s (%s)", record.key, shard, skip.reason, skip.detail)
            return True
        self.stats.samples_used += 1
        self._used_this_epoch += 1
        self._ready.extend(self.packer.add(sample))
        return True

    def _count_skip(self, reason: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1

    # -- one record --------------------------------------------------------

    def _load(self, record: _Record, reader: _ShardReader, shard: str) -> _SourcedSample:
        """Decodes and encodes one record; raises _Skip with the reason it cannot be used."""
        if "json" not in record.members:
            raise _Skip("missing_json", "no .json member")
        try:
            meta = json.loads(reader.read(record.members["json"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Skip("bad_json", str(e)) from None
        if not isinstance(meta, dict):
            raise _Skip("bad_json", f"top level is a {type(meta).__name__}, not an object")
        meta.setdefault("id", record.key)
        try:
            wanted = count_image_placeholders(meta)
        except ValueError as e:
            raise _Skip("invalid_record", str(e)) from None
        members = {}
        for ext, info in record.members.items():
            match = _IMAGE_MEMBER.match(ext)
            if match:
                members[int(match.group(1))] = info
        missing = [i for i in range(wanted) if i not in members]
        if missing:
            raise _Skip("missing_image", f"{wanted} <image> placeholders but no img{missing[0]} member")
        if len(members) != wanted:
            raise _Skip("invalid_record", f"{len(members)} image members but {wanted} <image> placeholders")
        images = []
        for i in range(wanted):
            try:
                image = decode_image(reader.read(members[i]))
                images.append(image_to_model_input(image, self.config))
            except ValueError as e:  # ImageDecodeError included
                raise _Skip("bad_image", f"img{i}: {e}") from None
        try:
            sample = self.encoder.encode(meta, images)
        except ValueError as e:
            raise _Skip("invalid_record", str(e)) from None
        fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(Sample)}
        return _SourcedSample(**fields, source=(shard, record.offset))

    def _reload(self, source: Sequence) -> _SourcedSample:
        shard, offset = source
        reader = _ShardReader(self.directory / shard, offset)
        try:
            record, _ = next(reader.records())
            return self._load(record, reader, shard)
        except (StopIteration, _TruncatedShard, _Skip) as e:
            raise RuntimeError(
                f"cannot restore the data stream: the record at byte {offset} of {shard} no longer "
                f"reads as it did when the state was saved ({e!r}); were the shards changed?"
            ) from None
        finally:
            reader.close()

    # -- checkpointing -----------------------------------------------------

    def state_dict(self) -> dict:
        def sources(packs: Sequence[Sequence[Sample]]) -> list[list[list]]:
            return [[list(sample.source) for sample in pack] for pack in packs]

        return {
            "format": _STATE_FORMAT,
            "shards": list(self.shards),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "infinite": self.infinite,
            "epoch": self._epoch,
            "shard_pos": self._shard_pos,
            "offset": self._offset,
            "record_index": self._record_index,
            "used_this_epoch": self._used_this_epoch,
            "exhausted": self._exhausted,
            "open_packs": sources(self.packer.pending()),
            "ready_packs": sources(self._ready),
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"data stream state has format {state.get('format')!r}, expected {_STATE_FORMAT}")
        for name in ("shards", "seed", "rank", "world_size", "shuffle", "infinite"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"data stream state was saved with {name} = {state[name]!r} but this stream has "
                    f"{getattr(self, name)!r}; the stream can only resume under the same setting"
                )
        self._reset_cursor(state["epoch"])
        self._shard_pos = state["shard_pos"]
        self._offset = state["offset"]
        self._record_index = state["record_index"]
        self._used_this_epoch = state["used_this_epoch"]
        self._exhausted = state["exhausted"]
        self.packer.load_pending([[self._reload(s) for s in pack] for pack in state["open_packs"]])
        self._ready = collections.deque([self._reload(s) for s in pack] for pack in state["ready_packs"])
        self.stats.load_state_dict(state["stats"])
