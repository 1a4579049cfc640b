"""Prints how unevenly vision tokens fall on data-parallel ranks per step, with and without balancing.

    python benchmarks/vision_balance.py
    python benchmarks/vision_balance.py --ranks 32 --microbatches 1 4 16 --seq-lengths 4096

Every simulated rank draws its own samples from the mix of
benchmarks/packing_efficiency.py (its own seed), packs them with
GreedyPacker and takes m microbatches of ``--micro-batch-size`` packs per
step. A step's imbalance is max / mean of the ranks' vision-token sums
(megavl.data.balance.imbalance): the slowest rank's vision encoder sets the
step time, so 1.5 means the encoder runs 50% longer than an even split
would. "Balanced" applies balance_assignment, the function training uses,
to the same counts. Printed per m: mean and p95 of the per-step imbalance
without and with balancing, the fraction of microbatches moved, and the
mean time of one balance_assignment call.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from packing_efficiency import MERGE, vlm_mix  # noqa: E402

from megavl.data.balance import assigned_loads, balance_assignment, imbalance, packs_moved  # noqa: E402
from megavl.data.packing import GreedyPacker  # noqa: E402


# Dropped samples are counted in the packer's stats; one warning each would bury the table.
logging.getLogger("megavl.data.packing").setLevel(logging.ERROR)


def microbatch_counts(seed: int, count: int, seq_length: int, micro_batch_size: int,
                      max_images_per_pack: int, max_vision_tokens_per_pack: int) -> list[int]:
    """Vision tokens of the first `count` microbatches one rank's packer emits."""
    packer = GreedyPacker(seq_length, max_images_per_pack, max_vision_tokens_per_pack=max_vision_tokens_per_pack,
                          spatial_merge_size=MERGE)
    stream = vlm_mix(seed)
    packs: list[int] = []
    while len(packs) < count * micro_batch_size:
        packs.extend(packer.vision_tokens(p) for p in packer.add(next(stream)))
    return [sum(packs[i : i + micro_batch_size]) for i in range(0, count * micro_batch_size, micro_batch_size)]


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def simulate(streams: list[list[int]], m: int, steps: int) -> dict:
    before, after, moved, seconds = [], [], 0, 0.0
    for step in range(steps):
        counts = [stream[step * m : (step + 1) * m] for stream in streams]
        started = time.perf_counter()
        assignment = balance_assignment(counts)
        seconds += time.perf_counter() - started
        before.append(imbalance([sum(row) for row in counts]))
        after.append(imbalance(assigned_loads(counts, assignment)))
        moved += packs_moved(assignment)
    return {
        "before_mean": statistics.fmean(before), "before_p95": p95(before),
        "after_mean": statistics.fmean(after), "after_p95": p95(after),
        "moved": moved / (steps * m * len(streams)), "ms": 1000 * seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="microbatches per rank per step (m)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="packs (rows) per microbatch")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--max-images-per-pack", type=int, default=64)
    parser.add_argument("--max-vision-tokens-per-pack", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for seq_length in args.seq_lengths:
        streams = [
            microbatch_counts(args.seed * 1000 + rank, args.steps * max(args.microbatches), seq_length,
                              args.micro_batch_size, args.max_images_per_pack, args.max_vision_tokens_per_pack)
            for rank in range(args.ranks)
        ]
        print(f"\n{args.ranks} ranks, {args.steps} steps, seq_length {seq_length}, micro-batch size "
              f"{args.micro_batch_size}, max_images_per_pack {args.max_images_per_pack}, "
              f"max_vision_tokens_per_pack {args.max_vision_tokens_per_pack}")
        print(f"{'m':>3}  {'unbalanced mean':>15} {'p95':>6}  {'balanced mean':>13} {'p95':>6}  "
              f"{'moved':>6}  {'ms/step':>7}")
        for m in args.microbatches:
            r = simulate(streams, m, args.steps)
            print(f"{m:>3}  {r['before_mean']:>15.3f} {r['before_p95']:>6.3f}  {r['after_mean']:>13.3f} "
                  f"{r['after_p95']:>6.3f}  {r['moved']:>6.1%}  {r['ms']:>7.2f}")


if __name__ == "__main__":
    main()
