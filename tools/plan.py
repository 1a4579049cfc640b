"""Capacity planner: can a config train on N nodes of a GPU type, how much memory, how fast.

    python tools/plan.py --config FILE [--set key=value ...] --nodes N --gpus-per-node 8 \\
        --gpu h100|h200|b200 [--mfu 0.4] [--recompute none|full] [--suggest]

Prints the parameters per component (total and active per token), the memory of
the most loaded GPU (weights, gradients, optimizer state, activations), the
largest image batch the vision tower could take, FLOPs per step and the step
time at the given MFU. Nothing is allocated; no GPU is needed.

Exit status: 0 the layout fits; 1 it is refused because it does not fit in GPU
memory; 2 it cannot run at all (the config is invalid for this world size or
does not divide). With --suggest the layouts that fit are listed as well; the
exit status still describes the configured layout.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megavl.config import ConfigError, add_config_args, config_from_args  # noqa: E402
from megavl.planning.activations import RECOMPUTE_CHOICES  # noqa: E402
from megavl.planning.capacity import DEFAULT_RESERVE_GIB, PlanOptions, make_plan  # noqa: E402
from megavl.planning.hardware import GPUS, Cluster, gpu_by_name  # noqa: E402
from megavl.planning.layouts import suggest  # noqa: E402
from megavl.planning.report import plan_report, suggestion_lines  # noqa: E402

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", choices=sorted(GPUS), required=True)
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="model FLOPs utilisation the step time is estimated at (default 0.4)")
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES, default="none",
                        help="activation recomputation the plan assumes (megavl has no recompute setting yet): "
                             "none keeps every activation; full is megatron's full recompute of every LM layer "
                             "(default none)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="GPU memory kept back for the CUDA context, NCCL and allocator fragmentation "
                             f"(default {DEFAULT_RESERVE_GIB:g})")
    parser.add_argument("--suggest", action="store_true", help="also list the layouts that fit, best first")
    parser.add_argument("--suggest-limit", type=int, default=15, help="how many suggestions to print (default 15)")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: must be in (0, 1]")
    if args.reserve_gib < 0:
        parser.error("--reserve-gib must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    cluster = Cluster(args.nodes, args.gpus_per_node, gpu_by_name(args.gpu))
    options = PlanOptions(mfu=args.mfu, recompute=args.recompute, reserve_gib=args.reserve_gib)
    plan = make_plan(config, cluster, options)
    title = args.config or "the default config"
    if args.overrides:
        title += " with " + " ".join(args.overrides)
    print("\n".join(plan_report(plan, title)))
    if args.suggest:
        print()
        print("\n".join(suggestion_lines(suggest(config, cluster, options), args.suggest_limit)))
    if not plan.valid:
        return EXIT_INVALID
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
