"""One plan: can this config train on this cluster, with how much memory per GPU, how fast.

Combines the layout check (``megavl.config.validate`` at the cluster's world
size, plus the divisibility megatron itself needs), the per-stage memory
(parameters.py, memory.py, activations.py) and the step time (flops.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megavl.config import Config, ConfigError, validate
from megavl.planning.activations import (
    Device,
    Recompute,
    StageActivations,
    largest_vision_patches,
    stage_activations,
)
from megavl.planning.flops import StepTime, step_time
from megavl.planning.hardware import GIB, Cluster
from megavl.planning.memory import StateMemory, data_parallel_groups, state_memory
from megavl.planning.parameters import GPUParameters, gpu_parameters

# CUDA context, NCCL buffers and what the caching allocator holds beyond live tensors.
DEFAULT_RESERVE_GIB = 5.0


@dataclass(frozen=True)
class PlanOptions:
    mfu: float = 0.4
    recompute: Recompute = "none"
    reserve_gib: float = DEFAULT_RESERVE_GIB
    device: Device = "cuda"


@dataclass(frozen=True)
class StagePlan:
    """One GPU of a pipeline stage (every GPU of a stage holds the same amount)."""

    stage: int
    params: GPUParameters
    state: StateMemory
    activations: StageActivations

    @property
    def total(self) -> float:
        return self.state.total + self.activations.total


@dataclass(frozen=True)
class Plan:
    config: Config
    cluster: Cluster
    options: PlanOptions
    # Why the layout cannot run at all (validation, divisibility); empty when it can.
    problems: list[str] = field(default_factory=list)
    stages: list[StagePlan] = field(default_factory=list)
    microbatches: int = 0
    data_parallel: int = 0
    expert_data_parallel: int = 0
    time: Optional[StepTime] = None

    @property
    def usable_bytes(self) -> float:
        return self.cluster.gpu.memory_bytes - self.options.reserve_gib * GIB

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def most_loaded(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.valid and self.most_loaded.total <= self.usable_bytes

    def memory_refusals(self) -> list[str]:
        """One reason per pipeline stage whose GPUs would run out of memory."""
        reasons = []
        for s in self.stages:
            over = s.total - self.usable_bytes
            if over > 0:
                reasons.append(
                    f"pipeline stage {s.stage}: {s.total / GIB:.1f} GiB per GPU (weights {s.state.weights / GIB:.1f}, "
                    f"gradients {s.state.gradients / GIB:.1f}, optimizer {s.state.optimizer / GIB:.1f}, "
                    f"activations {s.activations.total / GIB:.1f}) is over the usable "
                    f"{self.usable_bytes / GIB:.1f} GiB of a {self.cluster.gpu.name} "
                    f"({self.cluster.gpu.memory_gib:.1f} GiB less a {self.options.reserve_gib:g} GiB reserve) "
                    f"by {over / GIB:.1f} GiB"
                )
        return reasons

    def largest_vision_patches(self) -> int:
        """Patches per microbatch the vision tower could take in stage 0's memory left."""
        first = self.stages[0]
        others = first.total - first.activations.in_flight * first.activations.vision_tower
        return largest_vision_patches(self.config, self.usable_bytes - others, first.activations.in_flight,
                                      self.options.device)


def layout_problems(config: Config, world_size: int) -> list[str]:
    """Everything that keeps the layout from running: validate's messages, one per line."""
    problems = []
    try:
        validate(config, world_size)
    except ConfigError as e:
        problems += _problem_lines(str(e))
    return problems


def _problem_lines(message: str) -> list[str]:
    lines = message.splitlines()
    if len(lines) == 1:
        return [message.split(": ", 1)[1] if ": " in message else message]
    return [line.strip()[2:] for line in lines[1:] if line.strip().startswith("- ")]


def make_plan(config: Config, cluster: Cluster, options: PlanOptions = PlanOptions()) -> Plan:
    problems = layout_problems(config, cluster.world_size)
    if problems:
        return Plan(config, cluster, options, problems=problems)
    dp, edp = data_parallel_groups(config, cluster.world_size)
    microbatches = config.train.global_batch_size // (config.train.micro_batch_size * dp)
    stages = []
    for stage in range(config.parallel.pipeline):
        params = gpu_parameters(config, stage)
        stages.append(StagePlan(
            stage, params, state_memory(config, params, cluster.world_size),
            stage_activations(config, stage, microbatches, options.device, options.recompute),
        ))
    time = step_time(config, cluster, microbatches, options.mfu, options.recompute)
    return Plan(config, cluster, options, stages=stages, microbatches=microbatches, data_parallel=dp,
                expert_data_parallel=edp, time=time)
