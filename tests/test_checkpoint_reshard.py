"""A dist_checkpointing checkpoint saved at TP=2 reloads at TP=1 with the same logits."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIG, read_json, run_torchrun

pytestmark = pytest.mark.slow

COMMON = ["train.micro_batch_size=1", "train.global_batch_size=2", "train.seq_length=256"]


def test_tp2_checkpoint_reloads_at_tp1(tmp_path):
    run_torchrun(2, "train_layout.py", [
        "--config", str(TINY_CONFIG), "--set", *COMMON, "parallel.tensor=2",
        "--steps", "2", "--save-final", str(tmp_path / "ckpt"), "--logits",
        "--out", str(tmp_path / "tp2.json"),
    ])
    run_torchrun(1, "train_layout.py", [
        "--config", str(TINY_CONFIG), "--set", *COMMON,
        "--steps", "0", "--init", str(tmp_path / "ckpt"), "--logits",
        "--out", str(tmp_path / "tp1.json"),
    ])
    tp2 = torch.tensor(read_json(tmp_path / "tp2.json")["logits"])
    tp1 = torch.tensor(read_json(tmp_path / "tp1.json")["logits"])
    assert tp1.shape == tp2.shape
    assert tp1.shape[-1] == 2048  # whole vocabulary, gathered over TP
    # Trained weights, so a silently skipped tensor would show as a large difference.
    torch.testing.assert_close(tp1, tp2, atol=1e-5, rtol=0)
