"""Writing WebDataset tar shards that appear only once complete.

Each shard is written as ``<name>.tmp`` and renamed to ``<prefix>-NNNNNN.tar``
when closed, so a crash never leaves a truncated shard under a final name
(a loader globbing ``*.tar`` does not see the temporary file). Members carry
a fixed mtime, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from typing import Optional, Sequence

TEMPORARY_SUFFIX = ".tar.tmp"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Writes samples, ``samples_per_shard`` to a shard, into ``out_dir``."""

    def __init__(self, out_dir: str, prefix: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = out_dir
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.names: list[str] = []
        self._file = None
        self._tar: Optional[tarfile.TarFile] = None
        self._in_shard = 0

    def add(self, key: str, members: Sequence[tuple[str, bytes]]) -> None:
        """One sample: its members as (extension, bytes), stored as ``<key>.<extension>``."""
        if self._tar is None:
            self._open()
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish()

    def close(self) -> list[str]:
        """Finishes the last shard; returns the names of all shards written."""
        if self._tar is not None:
            self._finish()
        return list(self.names)

    def abort(self) -> None:
        """Drops the shard being written; finished shards stay."""
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._temporary(self.names[-1]))
            self.names.pop()
        self._file = self._tar = None

    def _temporary(self, name: str) -> str:
        return os.path.join(self.out_dir, name + ".tmp")

    def _open(self) -> None:
        self.names.append(shard_name(self.prefix, len(self.names)))
        self._file = open(self._temporary(self.names[-1]), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self._in_shard = 0

    def _finish(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self.names[-1]
        os.replace(self._temporary(name), os.path.join(self.out_dir, name))
        self._file = self._tar = None
