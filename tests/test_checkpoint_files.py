"""The folders of a checkpoint root: retention, clean-up of unfinished saves, and what counts as a step."""

from __future__ import annotations

import os

from megavl.training import checkpoint_files as files


def _root(tmp_path, names, latest=None):
    root = tmp_path / "ckpt"
    for name in names:
        (root / name).mkdir(parents=True)
    if latest:
        (root / files.LATEST).write_text(latest)
    return str(root)


def _left(root):
    return sorted(n for n in os.listdir(root) if n != files.LATEST)


def test_keep_last_keeps_the_newest_and_every_nth(tmp_path):
    root = _root(tmp_path, [f"iter_{s:07d}" for s in range(1, 9)], latest="iter_0000008")
    removed = files.prune(root, keep_last=2, keep_every=4)
    assert removed == ["iter_0000001", "iter_0000002", "iter_0000003", "iter_0000005", "iter_0000006"]
    assert _left(root) == ["iter_0000004", "iter_0000007", "iter_0000008"]


def test_keep_last_never_removes_the_folder_latest_names(tmp_path):
    # A run resumed from an older checkpoint: latest may name one that is not the newest.
    root = _root(tmp_path, ["iter_0000002", "iter_0000005", "iter_0000009"], latest="iter_0000002")
    assert files.prune(root, keep_last=1) == ["iter_0000005"]
    assert _left(root) == ["iter_0000002", "iter_0000009"]


def test_keep_last_zero_keeps_everything(tmp_path):
    root = _root(tmp_path, ["iter_0000001", "iter_0000002"], latest="iter_0000002")
    assert files.prune(root, keep_last=0) == []
    assert _left(root) == ["iter_0000001", "iter_0000002"]


def test_unfinished_saves_are_removed_unless_latest_names_them(tmp_path):
    root = _root(tmp_path, ["iter_0000001", "iter_0000002.partial", "iter_0000003.saved", "iter_0000004.saved"],
                 latest="iter_0000004.saved")
    assert files.remove_incomplete(root) == ["iter_0000002.partial", "iter_0000003.saved"]
    assert _left(root) == ["iter_0000001", "iter_0000004.saved"]
    assert files.remove_incomplete(str(tmp_path / "missing")) == []


def test_only_complete_folder_names_have_a_step(tmp_path):
    assert files.step_of("iter_0000120") == 120
    assert files.step_of("iter_12345678") == 12345678
    for name in ("iter_0000120.partial", "iter_0000120.saved", "latest", "iter_12"):
        assert files.step_of(name) is None
    assert files.iteration_dir("r", 7) == os.path.join("r", "iter_0000007")
