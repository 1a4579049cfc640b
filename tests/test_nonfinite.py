"""A step with a NaN / inf loss or gradient is not applied; a run stops after
train.max_nonfinite_steps of them in a row; no checkpoint is written from non-finite weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_CONFIG, _free_port
from trainer_runs import _overrides, data_dir  # noqa: F401  (data_dir is a fixture)


def _trainer(config):
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import set_seed
    from megavl.training.optimizer import build_optimizer, build_scheduler

    set_seed(0)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    return model, chunks, optimizer, build_scheduler(config, optimizer)


def _snapshot(model, optimizer, scheduler):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [
        {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        for inner in getattr(optimizer, "chained_optimizers", [optimizer])
        for state in inner.optimizer.state.values()
    ]
    return weights, moments, scheduler.num_steps


def _assert_same(a, b):
    (wa, ma, sa), (wb, mb, sb) = a, b
    assert sa == sb
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_a_non_finite_step_changes_nothing_and_training_continues_as_if_it_never_came(megatron_world):
    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    config = megatron_world
    microbatches = num_microbatches(config, 1)
    batches = random_batches(config, 3 * microbatches, seed=5)
    good_1, spiked, good_3 = (batches[i * microbatches:(i + 1) * microbatches] for i in range(3))
    with_images = next(b for b in spiked if b["pixel_values"] is not None)
    with_images["pixel_values"] = torch.full_like(with_images["pixel_values"], float("nan"))

    model, chunks, optimizer, scheduler = _trainer(config)
    first = train_step(config, chunks, optimizer, scheduler, iter(good_1), microbatches)
    assert not first.nonfinite and not first.skipped
    after_first = _snapshot(model, optimizer, scheduler)
    result = train_step(config, chunks, optimizer, scheduler, iter(spiked), microbatches)
    assert result.nonfinite and result.skipped
    _assert_same(_snapshot(model, optimizer, scheduler), after_first)
    third = train_step(config, chunks, optimizer, scheduler, iter(good_3), microbatches)
    assert not third.nonfinite

    # The same model trained on the two finite steps alone ends identical.
    model_b, chunks_b, optimizer_b, scheduler_b = _trainer(config)
    train_step(config, chunks_b, optimizer_b, scheduler_b, iter(good_1), microbatches)
    again = train_step(config, chunks_b, optimizer_b, scheduler_b, iter(good_3), microbatches)
    assert again.loss == third.loss
    _assert_same(_snapshot(model, optimizer, scheduler), _snapshot(model_b, optimizer_b, scheduler_b))


def test_the_guard_counts_skipped_steps_and_stops_after_the_limit_in_a_row():
    from megavl.training.nonfinite import NonFiniteGuard, NonFiniteTrainingError
    from megavl.training.step import StepResult

    def result(nonfinite):
        return StepResult(loss=float("nan") if nonfinite else 1.0, answer_tokens=10, grad_norm=1.0, lr=1e-3,
                          skipped=nonfinite, nonfinite=nonfinite)

    guard = NonFiniteGuard(limit=3, skipped_steps=4)  # 4 skipped before a resume
    assert guard.record(1, result(False)) is None
    assert "update skipped (1 in a row of at most 3, 5 in all)" in guard.record(2, result(True))
    assert "2 in a row" in guard.record(3, result(True))
    assert guard.record(4, result(False)) is None  # a finite step resets the run of them
    guard.record(5, result(True))
    guard.record(6, result(True))
    with pytest.raises(NonFiniteTrainingError, match=r"step 7: 3 steps in a row .*train.max_nonfinite_steps = 3"):
        guard.record(7, result(True))
    assert guard.skipped_steps == 9


def test_no_checkpoint_is_written_from_non_finite_weights(megatron_world, tmp_path):
    from megavl.config import replace_field
    from megavl.training.checkpoint import CheckpointSaveError, TrainState
    from megavl.training.checkpointer import Checkpointer

    class Stream:
        def state_dict(self):
            return {"pos": 0}

    class Messages:
        def message(self, text):
            pass

    root = tmp_path / "ckpt"
    config = replace_field(replace_field(megatron_world, "checkpoint.dir", str(root)), "checkpoint.interval", 1)
    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    model, chunks, optimizer, scheduler = _trainer(config)
    microbatches = num_microbatches(config, 1)
    train_step(config, chunks, optimizer, scheduler, iter(random_batches(config, microbatches, seed=2)), microbatches)
    checkpointer = Checkpointer(config, model, optimizer, scheduler, Stream(), Messages())
    checkpointer.save(TrainState(step=1))
    assert (root / "latest").read_text().strip() == "iter_0000001"
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointSaveError, match="not saving step 2 .* NaN or inf"):
        checkpointer.save(TrainState(step=2))
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert not any(name.startswith("iter_0000002") for name in os.listdir(root))


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_reason_after_the_limit(data_dir, tmp_path):
    """A learning rate of 1e30 sends the weights past what fp32 activations can hold after one
    step: every later step is non-finite, so the run stops after max_nonfinite_steps of them."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(_free_port()), str(ROOT / "pretrain_vlm.py"), "--config", str(TINY_CONFIG),
               "--set", *_overrides(data_dir, run, steps=10, extra=[
                   "train.lr=1e30", "train.min_lr=0", "train.warmup_steps=0", "train.clip_grad=0",
                   "train.max_nonfinite_steps=3", "checkpoint.interval=1"])]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "non-finite loss or gradient" in output and "update skipped (1 in a row of at most 3" in output, output[-3000:]
    assert "3 steps in a row had a non-finite loss or gradient" in output, output[-3000:]
    # Every checkpoint written holds the (finite) weights of the last applied step.
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("iter_")
