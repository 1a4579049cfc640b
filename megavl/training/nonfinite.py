"""What the run does about steps whose loss or gradients are not finite.

training/step.py already leaves such a step unapplied (parameters, optimizer state and
schedule unchanged) on every rank. Here the run counts them (``skipped_steps``, kept in
the checkpoint) and stops, with a message saying what happened, once
``train.max_nonfinite_steps`` come in a row: a transient spike is survived, a divergence
is not trained through. A checkpoint is never written from non-finite weights
(``parameters_finite``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megavl.platform.features import detect


class NonFiniteTrainingError(RuntimeError):
    """Too many non-finite steps in a row: the run stops without saving them."""


class NonFiniteGuard:
    def __init__(self, limit: int, skipped_steps: int = 0):
        self.limit = limit
        self.skipped_steps = skipped_steps
        self.in_a_row = 0

    def record(self, step: int, result) -> str | None:
        """Counts one step's outcome; returns a message for a skipped step, raises at the limit."""
        if not result.nonfinite:
            self.in_a_row = 0
            return None
        self.skipped_steps += 1
        self.in_a_row += 1
        what = (f"loss {result.loss}" if result.answer_tokens else "no answer tokens in the step")
        if self.in_a_row >= self.limit:
            raise NonFiniteTrainingError(
                f"step {step}: {self.in_a_row} steps in a row had a non-finite loss or gradient ({what}); "
                f"stopping (train.max_nonfinite_steps = {self.limit}). The weights are those of the last "
                "finite step; resume from the latest checkpoint with a lower train.lr or check the data"
            )
        return (f"step {step}: non-finite loss or gradient ({what}): update skipped "
                f"({self.in_a_row} in a row of at most {self.limit}, {self.skipped_steps} in all)")


def parameters_finite(model) -> bool:
    """Whether every rank's parameters are finite (one all-reduce)."""
    flag = torch.zeros(1, dtype=torch.int32, device=detect().device)
    for param in model.parameters():
        flag |= (~torch.isfinite(param.detach()).all()).to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())
