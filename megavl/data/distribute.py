"""Hands each data-parallel rank its microbatches for one optimizer step.

Two policies (``data.layout_invariant``):

* invariant (default): every rank reads the one global stream of packed
  microbatches and keeps microbatch i of a step when i % DP == its rank. A run
  then sees the same global batches whatever its DP size, so layouts can be
  compared and changed mid-run; the price is that every rank decodes every sample.
* sharded: records are split across DP ranks before packing; each rank decodes
  only its own samples, and batches depend on the DP size.
"""

from __future__ import annotations

from typing import Callable


class StepBatches:
    def __init__(self, make_stream: Callable[[int, int], object], microbatches: int, dp_rank: int,
                 dp_size: int, layout_invariant: bool):
        self.microbatches = microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.layout_invariant = layout_invariant
        if layout_invariant:
            self.stream = make_stream(0, 1)
        else:
            self.stream = make_stream(dp_rank, dp_size)

    def next_step(self) -> list[dict]:
        """This rank's microbatches of the next step; fewer than asked only when a finite stream ends."""
        wanted = self.microbatches * (self.dp_size if self.layout_invariant else 1)
        taken = []
        for batch in self.stream:
            taken.append(batch)
            if len(taken) == wanted:
                break
        if self.layout_invariant:
            if len(taken) < wanted:
                return []  # a partial global step cannot be split evenly
            return taken[self.dp_rank :: self.dp_size]
        return taken

    @property
    def stats(self):
        return self.stream.stats

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
