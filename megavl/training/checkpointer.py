"""The training loop's view of checkpoints: where a run starts, when it saves, what it keeps.

``with_resume_resolved`` turns ``checkpoint.resume: auto`` into a config whose
``checkpoint.load`` is ``checkpoint.dir`` when that holds a complete checkpoint
(and removes saves that never completed). ``Checkpointer.restore()`` resumes from
``checkpoint.load`` or starts from the weights in ``checkpoint.pretrained``;
``save(state)`` writes a checkpoint when the step falls on ``checkpoint.interval``,
and ``save(state, last=True)`` writes the final one unless that step was just
saved; after each save only ``checkpoint.keep_last`` (plus every ``keep_every``-th)
are kept. With ``checkpoint.async_save`` interval saves are written in the
background and ``poll()`` (every step, on every rank) puts finished ones in place;
the final save first waits for those. The format itself (atomic ``latest``, resharding) is
megavl/training/checkpoint.py's; the folders, checkpoint_files.py's.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megavl.config import Config, replace_field
from megavl.models.build import parameters_gathered
from megavl.models.parts import trained_parts
from megavl.training.checkpoint import (
    BackgroundSaves,
    CheckpointSaveError,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from megavl.training.checkpoint_files import prune, remove_incomplete
from megavl.training.nonfinite import parameters_finite
from megavl.training.optimizer import optimizer_form

log = logging.getLogger(__name__)


def with_resume_resolved(config: Config, metrics) -> Config:
    """The config this run resumes with: checkpoint.load set from checkpoint.dir under
    checkpoint.resume = auto. Decided on rank 0 and broadcast, so every rank agrees."""
    c = config.checkpoint
    decision = [None]
    if dist.get_rank() == 0 and c.dir:
        removed = remove_incomplete(c.dir)
        if removed:
            metrics.message(f"removed incomplete checkpoint saves in {c.dir}: {', '.join(removed)}")
        if not c.load and c.resume == "auto":
            try:
                decision = [latest_checkpoint(c.dir)]
            except FileNotFoundError as e:  # raised below on every rank, not on rank 0 alone
                decision = [e]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], Exception):
        raise decision[0]
    if decision[0] is None:
        return config
    metrics.message(f"checkpoint.resume = auto: resuming from {decision[0]} "
                    "(set checkpoint.resume=never to start afresh)")
    return replace_field(config, "checkpoint.load", c.dir)


def stage_lineage(pretrained: str) -> list[dict]:
    """The stages that led to the weights in ``pretrained``: what its own checkpoint recorded,
    plus that checkpoint itself (a weights-only folder, e.g. a converted model, has no stage;
    one a tool made from a trained checkpoint names the tool and keeps that checkpoint's chain)."""
    from megatron.core import dist_checkpointing

    folder = latest_checkpoint(pretrained)
    common = dist_checkpointing.load_common_state_dict(folder)
    train_state = common.get("train_state") or {}
    stored = common.get("config") or {}
    earlier = list(common.get("lineage") or (train_state.get("extra") or {}).get("lineage", []))
    return earlier + [{
        "stage": (stored.get("train") or {}).get("stage") or common.get("made_by"),
        "checkpoint": os.path.abspath(folder),
        "step": train_state.get("step"),
    }]


class Checkpointer:
    def __init__(self, config: Config, model, optimizer, scheduler, data, metrics, chunks=()):
        """chunks: the DDP-wrapped model chunks, whose weights a save brings up to date first
        (perf.overlap_param_gather leaves them to the next forward)."""
        self.config = config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.chunks = list(chunks)
        self.data = data  # the training stream, whose position is saved with the weights
        self.metrics = metrics
        self.dir = config.checkpoint.dir
        self._start_step = 0
        self._saved_step: Optional[int] = None
        self._saved_folder: Optional[str] = None
        self._background = BackgroundSaves() if config.checkpoint.async_save else None

    def restore(self) -> TrainState:
        """The state the run starts from: a resumed one, or step 0 (from pretrained weights if given)."""
        c = self.config.checkpoint
        state = TrainState()
        if c.load:
            state = load_checkpoint(c.load, self.model, self.optimizer, self.scheduler, self.data,
                                    trained=trained_parts(self.config),
                                    form=optimizer_form(self.config, ps.get_data_parallel_world_size(), self.optimizer))
            self.metrics.message(f"resumed from {latest_checkpoint(c.load)} at step {state.step}")
        elif c.pretrained:
            fresh = load_model_weights(self.model, c.pretrained, allow_fresh_adapters=True)
            self.metrics.message(f"started from the weights in {c.pretrained}"
                                 + (f" ({len(fresh)} vision-adapter tensors start fresh)" if fresh else ""))
            state.extra["lineage"] = stage_lineage(c.pretrained)
        lineage = state.extra.get("lineage")
        if lineage:
            self.metrics.message("stage lineage: " + " -> ".join(
                f"{entry['stage'] or 'weights'} ({entry['checkpoint']}"
                + (f", step {entry['step']})" if entry["step"] is not None else ")") for entry in lineage)
                + f" -> {self.config.train.stage or 'this run'}")
        self._start_step = state.step
        return state

    def save(self, state: TrainState, last: bool = False) -> None:
        """Saves on the interval, or (last) at the end of a run that trained at least one step."""
        if not self.dir:
            return
        interval = self.config.checkpoint.interval
        if last:
            # A background save of an earlier step must be in place before the
            # final one, so that latest moves forward only.
            self.poll(wait=True)
            if state.step == self._start_step:
                return  # nothing trained since the checkpoint the run started from
            if self._saved_step != state.step:
                self._write(state, background=None)
            self.metrics.message(f"checkpoint: {os.path.abspath(self._saved_folder)}")
        elif interval and state.step % interval == 0:
            # One background save at a time: host memory holds one staged copy.
            self.poll(wait=True)
            self._write(state, background=self._background)

    def poll(self, wait: bool = False) -> None:
        """Puts finished background saves in place (a collective when one is pending)."""
        if self._background is None:
            return
        for folder in self._background.poll(wait):
            log.info("checkpoint written in the background: %s", os.path.abspath(folder))
            self._prune()

    def close(self) -> None:
        """Waits for background saves, so no process exits with a write half done."""
        self.poll(wait=True)

    def _write(self, state: TrainState, background: Optional[BackgroundSaves]) -> None:
        with parameters_gathered(self.chunks):
            self._write_gathered(state, background)

    def _write_gathered(self, state: TrainState, background: Optional[BackgroundSaves]) -> None:
        if not parameters_finite(self.model):
            raise CheckpointSaveError(
                f"not saving step {state.step} to {self.dir}: the parameters hold NaN or inf values; "
                "the previous checkpoint is still the latest")
        self._saved_folder = save_checkpoint(self.dir, self.config, self.model, self.optimizer, self.scheduler,
                                             state, self.data.state_dict(), background=background)
        self._saved_step = state.step
        if background is None:
            self._prune()

    def _prune(self) -> None:
        c = self.config.checkpoint
        if dist.get_rank() == 0 and c.keep_last:
            try:
                removed = prune(self.dir, c.keep_last, c.keep_every)
            except OSError as e:  # a checkpoint too many is no reason to stop training
                log.warning("could not remove old checkpoints in %s: %s", self.dir, e)
            else:
                if removed:
                    log.info("removed old checkpoints (checkpoint.keep_last = %d): %s", c.keep_last, ", ".join(removed))
