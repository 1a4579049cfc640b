"""Checks the capacity planner against a built model: per-rank parameters and activation memory.

    python benchmarks/plan_activation_check.py --config examples/configs/tiny_cpu.yaml
    torchrun --nproc-per-node 2 benchmarks/plan_activation_check.py --config examples/configs/tiny_moe_cpu.yaml \\
        --set parallel.tensor=2 parallel.sequence_parallel=true

Every rank builds its stage of the model, runs one training-mode forward per
sequence length on a probe microbatch (images then text) and measures the bytes
autograd saves for backward (megavl/planning/measured.py); the planner
estimates the same from the config alone (megavl/planning/activations.py, for
this machine's device). Rank 0 prints one line per rank and length and exits 1
when an estimate is off by more than --tolerance or a parameter count differs.
On CUDA it also prints the peak allocated during the forward, which includes
transient buffers the estimate does not count.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> int:
    import torch
    import torch.distributed as dist

    from megavl.config import add_config_args, config_from_args, replace_field
    from megavl.models.build import build_model, local_parameter_counts
    from megavl.planning.activations import stage_activations
    from megavl.planning.measured import measure_forward, probe_microbatch, vision_tokens_per_row
    from megavl.planning.parameters import gpu_parameters
    from megavl.platform.distributed import init_distributed, set_seed, shutdown
    from megavl.platform.features import detect

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--images", type=int, default=2, help="images per row")
    parser.add_argument("--image-side", type=int, default=112, help="pixels per side of each square image")
    parser.add_argument("--tolerance", type=float, default=0.25, help="largest relative error accepted")
    parser.add_argument("--json", default=None, help="also write the results to this file (rank 0)")
    args = parser.parse_args()
    config = config_from_args(args)
    config = replace_field(config, "data.max_vision_tokens_per_pack",
                           vision_tokens_per_row(config, args.images, args.image_side))
    layout = init_distributed(config)
    set_seed(config.train.seed)
    platform = detect()
    device = "cuda" if platform.cuda else "cpu"
    model = build_model(config)
    if platform.cuda:
        model.cuda()
    stage = layout.pipeline_rank

    local = local_parameter_counts(model)
    planned = gpu_parameters(config, stage).by_component
    rows = []
    for seq_length in args.seq_lengths:
        probe_config = replace_field(config, "train.seq_length", seq_length)
        batch = probe_microbatch(probe_config, args.images, args.image_side, seed=seq_length)
        if platform.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        measured = measure_forward(model, probe_config, batch, platform)
        peak = torch.cuda.max_memory_allocated() - before if platform.cuda else None
        estimated = stage_activations(probe_config, stage, 1, device).per_microbatch_total
        rows.append({"rank": layout.rank, "stage": stage, "seq_length": seq_length, "measured": measured,
                     "estimated": round(estimated), "error": estimated / measured - 1, "peak_allocated": peak,
                     "parameters": {name: [local.get(name, 0), planned[name]] for name in planned}})
    gathered = [None] * layout.world_size
    dist.all_gather_object(gathered, rows)
    failed = False
    if layout.rank == 0:
        print(f"{args.config} {' '.join(args.overrides or [])} | {layout.describe()} | {device}, "
              f"tolerance {args.tolerance:.0%}")
        for rank_rows in gathered:
            for row in rank_rows:
                counts_match = all(built == plan for built, plan in row["parameters"].values())
                off = abs(row["error"]) > args.tolerance
                failed |= off or not counts_match
                peak = f", peak allocated {row['peak_allocated']:,}" if row["peak_allocated"] is not None else ""
                print(f"rank {row['rank']} stage {row['stage']} seq {row['seq_length']}: activations measured "
                      f"{row['measured']:,} B, estimated {row['estimated']:,} B ({row['error']:+.2%})"
                      f"{' OVER TOLERANCE' if off else ''}{peak}; parameters "
                      f"{'match' if counts_match else 'DIFFER: ' + json.dumps(row['parameters'])}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump([row for rank_rows in gathered for row in rank_rows], f, indent=1)
    shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
