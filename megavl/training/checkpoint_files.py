"""The folders of a checkpoint root, and how a finished save is put in place.

    root/
      iter_0000100/           a complete checkpoint
      iter_0000200.partial/   a save being written: never loadable, removed at the next start
      iter_0000200.saved/     a complete save on its way to iter_0000200/ (loadable while latest names it)
      latest                  the name of the newest complete checkpoint, replaced atomically

``latest`` only ever names a complete folder, so a crash or a failed write at
any moment leaves the previous checkpoint loadable. Every rename is followed by
an fsync of the directory, so a power loss cannot undo a rename that ``latest``
already relies on. Only one process (global rank 0) calls the writers here.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Optional

from megatron.core import dist_checkpointing

LATEST = "latest"
PARTIAL = ".partial"
SAVED = ".saved"
_ITERATION = re.compile(r"^iter_(\d{7,})$")


def iteration_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def step_of(name: str) -> Optional[int]:
    """The step of a complete checkpoint folder's name (iter_0000100 -> 100), else None."""
    match = _ITERATION.match(name)
    return int(match.group(1)) if match else None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_latest(root: str) -> Optional[str]:
    """The folder name the latest marker holds, or None when there is no marker."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return f.read().strip()


def write_latest(root: str, name: str) -> None:
    tmp_marker = os.path.join(root, LATEST + ".tmp")
    with open(tmp_marker, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_marker, os.path.join(root, LATEST))
    fsync_dir(root)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint under root, a checkpoint folder itself, or None."""
    if dist_checkpointing.check_is_distributed_checkpoint(root):
        return root
    name = read_latest(root)
    if name is None:
        return None
    path = os.path.join(root, name)
    if name.endswith(SAVED) and not os.path.exists(path):
        # A crash after the last rename of publish() but before the marker followed it.
        path = path[: -len(SAVED)]
    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        raise FileNotFoundError(f"{os.path.join(root, LATEST)} names {name!r}, which is not a complete checkpoint")
    return path


def publish(root: str, partial: str, final: str) -> None:
    """Puts the complete save in ``partial`` in place as ``final`` and points latest at it.

    A folder already at ``final`` (the same step saved again) is removed only once
    latest names the new save, so no moment leaves latest without a checkpoint.
    """
    saved = final + SAVED
    shutil.rmtree(saved, ignore_errors=True)
    os.replace(partial, saved)
    fsync_dir(root)
    write_latest(root, os.path.basename(saved))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(saved, final)
    fsync_dir(root)
    write_latest(root, os.path.basename(final))


def remove_incomplete(root: str) -> list[str]:
    """Removes saves that never completed (and complete ones latest does not name); returns their names."""
    if not os.path.isdir(root):
        return []
    named = read_latest(root)
    removed = []
    for name in sorted(os.listdir(root)):
        if (name.endswith(PARTIAL) or name.endswith(SAVED)) and name != named:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def prune(root: str, keep_last: int, keep_every: int = 0) -> list[str]:
    """Removes complete checkpoints beyond the newest keep_last (0: keep all), except those
    whose step is a multiple of keep_every and the one latest names; returns their names."""
    if keep_last < 1:
        return []
    steps = sorted(s for s in (step_of(n) for n in os.listdir(root)) if s is not None)
    named = read_latest(root)
    removed = []
    for step in steps[:-keep_last]:
        name = os.path.basename(iteration_dir(root, step))
        if (keep_every and step % keep_every == 0) or name == named:
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    if removed:
        fsync_dir(root)
    return removed
