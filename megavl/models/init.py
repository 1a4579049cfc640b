"""Layout-invariant initialisation: the same weights under every TP / PP / EP layout.

megatron initialises per rank (and per pipeline stage with its own seed), so a
PP=2 run starts from different weights than one process. Here every global
tensor, named by its checkpoint key, gets its own generator seeded from
(seed, key); each rank generates the whole tensor and keeps its slice, read
from the same sharding metadata dist_checkpointing uses. Changing the cluster
layout therefore never changes the model a run starts from.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megavl.config import Config


def _local_shards(item) -> list[ShardedTensor]:
    if isinstance(item, ShardedTensorFactory):
        built = item.build()
        return [t for t in (built.values() if isinstance(built, dict) else built) if isinstance(t, ShardedTensor)]
    if isinstance(item, ShardedTensor):
        return [item]
    return []


def _flatten(state) -> list:
    if isinstance(state, dict):
        return [leaf for value in state.values() for leaf in _flatten(value)]
    if isinstance(state, (list, tuple)):
        return [leaf for value in state for leaf in _flatten(value)]
    return [state]


def _initial_value(key: str, shape: tuple, generator: torch.Generator, config: Config) -> torch.Tensor:
    name = key.rsplit(".", 1)[-1]
    device = generator.device
    if name.endswith("bias") or name == "lora_b":
        # lora_b = 0: a fresh vision adapter changes nothing.
        return torch.zeros(shape, device=device)
    if name == "lora_a":
        return torch.randn(shape, generator=generator, device=device) / math.sqrt(shape[-1])
    if len(shape) == 1 and ("norm" in key):
        return torch.ones(shape, device=device)
    std = config.train.init_std
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")) and (".layers." in key or ".window_layers." in key):
        # Residual-branch outputs are scaled down with depth (GPT-2 / megatron's scaled init).
        if key.startswith("vision.window_layers."):
            layers = config.model.vision.window_stage.num_layers
        elif key.startswith("vision."):
            layers = config.model.vision.num_layers
        else:
            layers = config.model.lm.num_layers
        std = std / math.sqrt(2.0 * layers)
    return torch.randn(shape, generator=generator, device=device) * std


@torch.no_grad()
def initialize_layout_invariant(model, config: Config) -> None:
    """Overwrites every parameter of this rank's model chunk with its slice of the global init."""
    for item in _flatten(model.sharded_state_dict()):
        for shard in _local_shards(item):
            if shard.data is None or not shard.data.is_floating_point():
                continue
            prepend = shard.prepend_axis_num
            # Stacked tensors (e.g. per-expert) get one generator per stacked index.
            stacked_index = shard.global_offset[:prepend]
            seed_text = f"{config.train.seed}:{shard.key}:{stacked_index}"
            # Generated where the weight lives: fast on GPUs, and the same numbers
            # on every rank of one run.
            generator = torch.Generator(device=shard.data.device).manual_seed(zlib.crc32(seed_text.encode()))
            full = _initial_value(shard.key, tuple(shard.global_shape[prepend:]), generator, config)
            offsets = shard.global_offset[prepend:]
            local = full[tuple(slice(o, o + n) for o, n in zip(offsets, shard.local_shape))]
            shard.data.copy_(local.view(shard.data.shape).to(shard.data.dtype))
