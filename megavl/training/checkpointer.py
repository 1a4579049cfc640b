"""The training loop's view of checkpoints: where a run starts, and when it saves.

``restore()`` resumes from ``checkpoint.load`` or starts from the weights in
``checkpoint.pretrained``; ``save(state)`` writes a checkpoint when the step
falls on ``checkpoint.interval``, and ``save(state, last=True)`` writes the
final one unless that step was just saved. The format itself (atomic
``latest``, resharding) is megavl/training/checkpoint.py's.
"""

from __future__ import annotations

import os
from typing import Optional

from megavl.config import Config
from megavl.training.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)


class Checkpointer:
    def __init__(self, config: Config, model, optimizer, scheduler, data, metrics):
        self.config = config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data = data  # the training stream, whose position is saved with the weights
        self.metrics = metrics
        self.dir = config.checkpoint.dir
        self._start_step = 0
        self._saved_step: Optional[int] = None
        self._saved_folder: Optional[str] = None

    def restore(self) -> TrainState:
        """The state the run starts from: a resumed one, or step 0 (from pretrained weights if given)."""
        c = self.config.checkpoint
        state = TrainState()
        if c.load:
            state = load_checkpoint(c.load, self.model, self.optimizer, self.scheduler, self.data)
            self.metrics.message(f"resumed from {latest_checkpoint(c.load)} at step {state.step}")
        elif c.pretrained:
            fresh = load_model_weights(self.model, c.pretrained, allow_fresh_adapters=True)
            self.metrics.message(f"started from the weights in {c.pretrained}"
                                 + (f" ({len(fresh)} vision-adapter tensors start fresh)" if fresh else ""))
        self._start_step = state.step
        return state

    def save(self, state: TrainState, last: bool = False) -> None:
        """Saves on the interval, or (last) at the end of a run that trained at least one step."""
        if not self.dir:
            return
        interval = self.config.checkpoint.interval
        if last:
            if state.step == self._start_step:
                return  # nothing trained since the checkpoint the run started from
            if self._saved_step != state.step:
                self._write(state)
            self.metrics.message(f"checkpoint: {os.path.abspath(self._saved_folder)}")
        elif interval and state.step % interval == 0:
            self._write(state)

    def _write(self, state: TrainState) -> None:
        self._saved_folder = save_checkpoint(self.dir, self.config, self.model, self.optimizer, self.scheduler,
                                             state, self.data.state_dict())
        self._saved_step = state.step
