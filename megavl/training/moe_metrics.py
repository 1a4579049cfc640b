"""Mixture-of-experts numbers for one optimizer step, reduced over all ranks.

* router losses per layer (load balancing, z-loss) from megatron's tracker,
  as a mean per microbatch;
* expert load per layer, separately for text and vision tokens, and router
  entropy, from ``megavl.models.moe.RouterStatistics``.

Every rank runs the step inside ``router_statistics`` (leaving it runs
collectives on logging steps); only the logging rank uses the result. Reductions
use SUM only, which every back end (gloo too) has. The statistics are gathered
on the device and reach the host once per logging step; other steps record
nothing and only clear megatron's router-loss tracker.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from megavl.config import Config
from megavl.models.moe import RouterStatistics
from megavl.platform.features import detect


def _router_losses(microbatches: int) -> dict[str, list[float]]:
    tracker = get_moe_layer_wise_logging_tracker()
    losses = {}
    dp = ps.get_data_parallel_world_size()
    tp = ps.get_tensor_model_parallel_world_size()
    for name in sorted(tracker):
        values = tracker[name]["values"].detach().clone().float()
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if tracker[name].get("reduce_group") is not None:
            # Partial sums over the sequence slices of the TP ranks.
            dist.all_reduce(values, group=tracker[name]["reduce_group"])
        elif tp > 1:
            # A mean over each TP rank's equal slice: average them.
            dist.all_reduce(values, group=ps.get_tensor_model_parallel_group())
            values /= tp
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        losses[name] = (values / (dp * microbatches)).tolist()
    clear_aux_losses_tracker()
    return losses


def _router_statistics(config: Config, local: dict) -> dict:
    layers, experts = config.model.lm.num_layers, config.model.lm.moe.num_experts
    device = detect().device
    # [layer, modality (text, vision), expert] counts and [layer, (entropy sum, tokens)], filled
    # on the device from the device-side sums.
    load = torch.zeros(layers, 2, experts, dtype=torch.float64, device=device)
    entropy = torch.zeros(layers, 2, dtype=torch.float64, device=device)
    for layer_number, entry in local.items():
        index = layer_number - 1
        load[index, 0] = entry["text"].double()
        load[index, 1] = entry["vision"].double()
        entropy[index, 0] = entry["entropy_sum"]
        entropy[index, 1] = entry["tokens"]
    packed = torch.cat([load.flatten(), entropy.flatten()])
    # Every token is routed exactly once somewhere in the world.
    dist.all_reduce(packed)
    packed = packed.cpu()  # the one copy to the host
    load = packed[: load.numel()].view_as(load)
    entropy = packed[load.numel():].view_as(entropy)
    moe_layers = [i for i in range(layers) if entropy[i, 1] > 0]
    return {
        "expert_load": {
            str(i + 1): {"text": load[i, 0].long().tolist(), "vision": load[i, 1].long().tolist()}
            for i in moe_layers
        },
        "router_entropy": {str(i + 1): float(entropy[i, 0] / entropy[i, 1]) for i in moe_layers},
        "routed_tokens": {str(i + 1): int(entropy[i, 1]) for i in moe_layers},
    }


@dataclass
class StepRouterStats:
    """Filled when the ``router_statistics`` block ends; None for a dense LM."""

    stats: Optional[dict] = None

    def scalars(self) -> dict[str, float]:
        return scalars(self.stats) if self.stats else {}


@contextmanager
def router_statistics(config: Config, microbatches: int, collect: bool = True) -> Iterator[StepRouterStats]:
    """Records expert load and router entropy while the block runs one training step,
    then reduces them (and megatron's router losses) over all ranks. collect: whether this
    step logs them (the same on every rank); if not, nothing is recorded or reduced."""
    record = StepRouterStats()
    if config.model.lm.moe.num_experts == 0:
        yield record
        return
    if not collect:
        yield record
        # megatron's tracker sums every step's router losses; a logging step reports its own only.
        clear_aux_losses_tracker()
        return
    RouterStatistics.start()
    try:
        yield record
    except BaseException:
        RouterStatistics.stop()  # no collectives: the other ranks may not be here
        raise
    record.stats = _router_statistics(config, RouterStatistics.stop())
    record.stats["router_losses"] = _router_losses(microbatches)


def scalars(stats: dict) -> dict[str, float]:
    """Averages over MoE layers, for the progress line and jsonl."""
    out = {}
    for name, values in stats["router_losses"].items():
        nonzero = [v for v in values if v]
        out[f"moe_{name}"] = sum(nonzero) / len(nonzero) if nonzero else 0.0
    entropies = list(stats["router_entropy"].values())
    if entropies:
        out["moe_router_entropy"] = sum(entropies) / len(entropies)
    return out


def expert_load_image(stats: dict) -> np.ndarray:
    """An HWC uint8 heat map: one row per MoE layer, text experts left, vision experts right.

    Each cell is the expert's share of that layer's routed assignments for the
    modality (white = all, black = none); a red column separates the halves.
    """
    rows = []
    for layer in sorted(stats["expert_load"], key=int):
        parts = []
        for modality in ("text", "vision"):
            counts = np.asarray(stats["expert_load"][layer][modality], dtype=np.float64)
            total = counts.sum()
            parts.append(counts / total if total else counts)
        rows.append(parts)
    if not rows:
        return np.zeros((1, 1, 3), dtype=np.uint8)
    text = np.stack([r[0] for r in rows])
    vision = np.stack([r[1] for r in rows])
    scale = max(text.max(), vision.max(), 1e-12)
    grey = lambda a: np.repeat((255 * a / scale).astype(np.uint8)[..., None], 3, axis=-1)  # noqa: E731
    separator = np.zeros((len(rows), 1, 3), dtype=np.uint8)
    separator[..., 0] = 255
    image = np.concatenate([grey(text), separator, grey(vision)], axis=1)
    # Upscale so each cell is visible in TensorBoard.
    return np.kron(image, np.ones((16, 16, 1), dtype=np.uint8))
