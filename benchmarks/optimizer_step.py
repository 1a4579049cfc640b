"""Cost of one optimizer step: AdamW alone vs Muon (LM and adapter matrices) with AdamW beside it.

    python benchmarks/optimizer_step.py [--config FILE] [--set KEY=VALUE ...] [--steps N]

Builds the model of --config on one process (CPU, or the GPU when there is one), fills every
gradient with random values and times ``optimizer.step()`` alone (gradient clipping included,
no forward or backward), for each optimizer. Prints the median milliseconds per step, Muon's
share of the parameters and the ratio. Newton-Schulz costs about 5 x 3 matmuls per matrix
(2 x rows x cols x min(rows, cols) FLOPs each), so Muon's overhead grows with the matrices'
smaller side; the forward-backward it rides on grows with the tokens per step.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def measure(config_path: str, overrides: list[str], optimizer: str, steps: int) -> tuple[float, int, int]:
    import torch

    from megavl.config import load_config
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.features import detect
    from megavl.training.muon import uses_muon
    from megavl.training.optimizer import build_optimizer

    config = load_config(config_path, [*overrides, f"train.optimizer={optimizer}"])
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    built = build_optimizer(config, chunks)
    generator = torch.Generator(device="cpu").manual_seed(0)
    muon_elements = total = 0
    for name, param in chunks[0].named_parameters():
        if param.requires_grad:
            param.main_grad.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
            total += param.numel()
            muon_elements += param.numel() if uses_muon(name, param) else 0
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state
        if detect().cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        built.step()
        if detect().cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3, muon_elements, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/tiny_moe_cpu.yaml")
    parser.add_argument("--set", dest="overrides", nargs="*", action="extend", default=["parallel.expert=1"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    from megavl.config import load_config
    from megavl.platform.distributed import init_distributed

    init_distributed(load_config(args.config, args.overrides))
    adam_ms, _, total = measure(args.config, args.overrides, "adamw", args.steps)
    muon_ms, muon_elements, _ = measure(args.config, args.overrides, "muon", args.steps)
    print(f"config: {args.config} {' '.join(args.overrides)}; {total:,} trainable parameters, "
          f"{muon_elements:,} ({muon_elements / total:.0%}) updated by Muon")
    print(f"AdamW:        {adam_ms:8.2f} ms per optimizer step (median of {args.steps})")
    print(f"Muon + AdamW: {muon_ms:8.2f} ms per optimizer step ({muon_ms / adam_ms:.2f}x AdamW)")


if __name__ == "__main__":
    main()
