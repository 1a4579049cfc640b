"""Training runs of pretrain_vlm.py under torchrun, shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_CONFIG, _free_port


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from megavl.datasets.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(str(out), train_samples=160, val_samples=24, seed=3, vocab_size=2048, samples_per_shard=40)
    return out


def _overrides(data_dir, run_dir, steps, extra=(), image_backend="pillow"):
    # Runs compared with each other pin the image back end: `auto` decides by timing,
    # and DALI's pixels differ from Pillow's in the last bits.
    return [
        f"data.image_backend={image_backend}",
        f"data.train_path={data_dir}/train", f"data.val_path={data_dir}/val",
        f"data.tokenizer={data_dir}/tokenizer", "data.resolution.max_pixels=12544",
        "train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=2",
        f"train.steps={steps}", "train.lr=3e-3", "train.warmup_steps=2",
        "train.eval_interval=4", "train.eval_steps=1",
        f"logging.dir={run_dir}", f"checkpoint.dir={run_dir}/checkpoints", "checkpoint.interval=3",
        *extra,
    ]


def _train(nproc, overrides, timeout=600, config=TINY_CONFIG):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), str(ROOT / "pretrain_vlm.py"),
               "--config", str(config), "--set", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        pytest.fail(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result.stdout


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    return train, val
