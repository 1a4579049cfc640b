"""Hands each data-parallel rank its microbatches for one optimizer step.

Two policies (``data.layout_invariant``):

* invariant (default): every rank reads the one global stream of packed
  microbatches and keeps microbatch i of a step when i % DP == its rank. A run
  then sees the same global batches whatever its DP size, so layouts can be
  compared and changed mid-run; the price is that every rank decodes every sample.
* sharded: records are split across DP ranks before packing; each rank decodes
  only its own samples, and batches depend on the DP size.

With ``data.balance_vision_tokens`` the step's microbatches are then
redistributed so that every rank gets about the same number of vision tokens
(megavl/data/balance.py). In the invariant policy every rank already holds the
whole step and computes the same assignment; sharded ranks exchange counts and
microbatches. The step's loss is normalised over all its answer tokens, so
which rank computes which microbatch does not change the gradient.

Last, where the stream leaves decoding to the trainer (``data.decode_images_in``),
this rank's microbatches get their pixels on the training device
(trainer_decode.py): after the balancing, so that only encoded bytes are
exchanged and each image is decoded once, by the rank that trains on it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from megavl.data.balance import BalanceStats, balance_assignment, balance_step


def vision_tokens_of(batch: dict) -> int:
    return int(batch["vision_tokens"])


class StepBatches:
    def __init__(self, make_stream: Callable[[int, int], object], microbatches: int, dp_rank: int,
                 dp_size: int, layout_invariant: bool, balance: bool = False, group=None,
                 device: Optional[torch.device] = None):
        """device: where images the stream leaves undecoded are decoded (None: CUDA when available)."""
        self.microbatches = microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.layout_invariant = layout_invariant
        self.balance = balance and dp_size > 1
        self.group = group
        # Vision-token balance of the last step (None before one or without balancing).
        self.last_balance: Optional[BalanceStats] = None
        if layout_invariant:
            self.stream = make_stream(0, 1)
        else:
            self.stream = make_stream(dp_rank, dp_size)
        self.decoder = None
        if getattr(self.stream, "decode_in_trainer", False):
            from megavl.data.trainer_decode import TrainerImageDecoder

            self.decoder = TrainerImageDecoder(self.stream.config, device)

    def next_step(self) -> list[dict]:
        """This rank's microbatches of the next step, with their pixels; fewer than asked only
        when a finite stream ends."""
        batches = self._assigned()
        if self.decoder is not None:
            self._decode(batches)
        return batches

    def _decode(self, batches: list[dict]) -> None:
        failures = [failure for batch in batches for failure in self.decoder.decode(batch)]
        if self.layout_invariant and self.dp_size > 1 and self.group is not None:
            # Every rank counts the whole global stream, so each learns the failures in the others'
            # shares (they are disjoint); the counts then stay equal on all ranks.
            gathered = [None] * self.dp_size
            dist.all_gather_object(gathered, failures, group=self.group)
            failures = [failure for rank_failures in gathered for failure in rank_failures]
        self.stream.record_failures(failures)

    def _assigned(self) -> list[dict]:
        """The microbatches of the next step this rank trains on, as the stream gives them."""
        wanted = self.microbatches * (self.dp_size if self.layout_invariant else 1)
        taken = []
        for batch in self.stream:
            taken.append(batch)
            if len(taken) == wanted:
                break
        if self.layout_invariant:
            if len(taken) < wanted:
                return []  # a partial global step cannot be split evenly
            return self._share_of_global_step(taken)
        if self.balance and len(taken) == wanted:
            taken, self.last_balance = balance_step(taken, vision_tokens_of, self.group)
        return taken

    def _share_of_global_step(self, taken: list[dict]) -> list[dict]:
        per_rank = [taken[rank :: self.dp_size] for rank in range(self.dp_size)]
        if not self.balance:
            return per_rank[self.dp_rank]
        counts = [[vision_tokens_of(b) for b in batches] for batches in per_rank]
        assignment = balance_assignment(counts)
        self.last_balance = BalanceStats.of(counts, assignment)
        return [per_rank[source][index] for source, index in assignment[self.dp_rank]]

    def set_max_pixels(self, max_pixels: Optional[int]) -> None:
        self.stream.set_max_pixels(max_pixels)

    @property
    def stats(self):
        return self.stream.stats

    def close(self) -> None:
        self.stream.close()

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
