"""Bytes of weights, gradients and optimizer state on one GPU, under megatron's precision plan.

What megavl builds (megavl/models/build.py, megavl/training/optimizer.py):

* weights in train.dtype: 2 bytes per parameter in bf16, 4 in fp32;
* gradients in megatron DDP's contiguous buffer, reduced in fp32
  (``grad_reduce_in_fp32=True``): 4 bytes per trainable parameter, whole on
  every rank (the distributed optimizer reduce-scatters into the same buffer);
* Adam: fp32 first and second moments (8 bytes) per trainable parameter, plus
  an fp32 master copy of the weights (4 bytes) when training in bf16;
* ``parallel.distributed_optimizer``: the moments and master weights are
  sharded across the data-parallel group (dense parameters: world / (TP*PP)
  ranks) or the expert-data-parallel group (expert parameters:
  world / (EP*expert_tensor*PP) ranks); without it every rank holds them whole.

Frozen parameters (vision LoRA with ``enabled: false``) have weights only.
Bucket padding of the buffers (a few MB) is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from megavl.config import Config
from megavl.planning.parameters import GPUParameters

GRADIENT_BYTES = 4
ADAM_MOMENT_BYTES = 8
MASTER_WEIGHT_BYTES = 4


def weight_bytes_per_parameter(config: Config) -> int:
    return 2 if config.train.dtype == "bf16" else 4


def optimizer_bytes_per_parameter(config: Config) -> int:
    return ADAM_MOMENT_BYTES + (MASTER_WEIGHT_BYTES if config.train.dtype == "bf16" else 0)


def data_parallel_groups(config: Config, world_size: int) -> tuple[int, int]:
    """(data-parallel size, expert-data-parallel size): the groups the optimizer state is sharded over."""
    p = config.parallel
    return world_size // (p.tensor * p.pipeline * p.context), world_size // (p.expert * p.expert_tensor * p.pipeline)


@dataclass(frozen=True)
class StateMemory:
    """Weights, gradients and optimizer state of one GPU, in bytes."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def state_memory(config: Config, params: GPUParameters, world_size: int) -> StateMemory:
    dp, expert_dp = data_parallel_groups(config, world_size)
    if not config.parallel.distributed_optimizer:
        dp = expert_dp = 1
    per_param = optimizer_bytes_per_parameter(config)
    # Ceiling division: the last shard of an uneven split is the largest.
    optimizer = per_param * (-(-params.trainable_dense // dp) + -(-params.trainable_expert // expert_dp))
    return StateMemory(
        weights=weight_bytes_per_parameter(config) * params.total,
        gradients=GRADIENT_BYTES * (params.trainable_dense + params.trainable_expert),
        optimizer=optimizer,
    )


def assumptions(config: Config, world_size: int) -> list[str]:
    """The precision and sharding plan the numbers above assume, in words."""
    dp, edp = data_parallel_groups(config, world_size)
    master = " + fp32 master weights (4 B/param)" if config.train.dtype == "bf16" else ""
    if config.parallel.distributed_optimizer:
        sharding = f"sharded by the distributed optimizer over the data-parallel group (DP = {dp})"
        if config.model.lm.moe.num_experts:
            sharding = (f"sharded by the distributed optimizer over the data-parallel group (dense parameters, "
                        f"DP = {dp}) or the expert-data-parallel group (experts, EDP = {edp})")
    else:
        sharding = "whole on every rank (parallel.distributed_optimizer is off)"
    lines = [
        f"weights in train.dtype ({config.train.dtype}: {weight_bytes_per_parameter(config)} B/param); "
        "gradients in megatron DDP's fp32 buffer (4 B/param, whole on every rank)",
        f"Adam m and v in fp32 (8 B/param){master}, {sharding}",
    ]
    if config.train.optimizer == "muon":
        # Muon keeps one fp32 momentum per matrix element (4 B) where Adam keeps two; its
        # layer-wise distributed form shards whole weights, unevenly, over the same group.
        lines.append("train.optimizer = muon: every parameter is counted at Adam's 8 B/param, an upper bound "
                     "(Muon's matrices need 4 B/param for their one momentum buffer)")
    return lines
