"""Prints the mean training-step time of a config on this machine (random packed batches).

    python benchmarks/step_time.py --config examples/configs/tiny_cpu.yaml
    torchrun --nproc-per-node 2 benchmarks/step_time.py --config examples/configs/tiny_moe_cpu.yaml
    python benchmarks/step_time.py --config examples/configs/tiny_moe_cpu.yaml --set parallel.expert=1

Warm-up steps are excluded. The batches come from megavl.data.random_samples, so
the figure is the model's cost alone, not data loading.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    from megavl.config import add_config_args, config_from_args
    from megavl.data.random_samples import random_batches
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import init_distributed, set_seed, shutdown
    from megavl.training.optimizer import build_optimizer, build_scheduler
    from megavl.training.step import num_microbatches, train_step

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    config = config_from_args(args)
    layout = init_distributed(config)
    set_seed(config.train.seed)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    microbatches = num_microbatches(config, layout.data)
    total = args.steps + args.warmup
    batches = random_batches(config, microbatches * total, seed=layout.data_rank)
    times = []
    for step in range(total):
        started = time.perf_counter()
        train_step(config, chunks, optimizer, scheduler, iter(batches[step * microbatches:(step + 1) * microbatches]), microbatches)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    if layout.rank == 0:
        parameters = sum(p.numel() for p in model.parameters())
        print(f"{args.config} {' '.join(args.overrides or [])} | world {layout.world_size} | "
              f"params/rank {parameters:,} | step {statistics.mean(times):.3f} s "
              f"(median {statistics.median(times):.3f}, {len(times)} steps)")
    shutdown()


if __name__ == "__main__":
    main()
