"""Alternative layouts for a model and cluster: every valid TP / PP / EP that fits, best first.

Candidates: tensor parallelism a power of two up to the GPUs of a node (it
stays inside a node), with sequence parallelism on whenever TP > 1; every
pipeline size the world and the LM layers allow, each with its best
first-stage split (the one needing the least memory on the most loaded GPU);
expert parallelism over every divisor of the experts; expert tensor
parallelism 1; the distributed optimizer on. Everything else is the config's.

Ranking: estimated step time (the pipeline bubble and any recomputation are
what tell layouts apart at a fixed MFU), then the fewest model-parallel GPUs
(TP * PP), then the smallest expert-parallel group, then the least memory.
Communication time is not modelled.
"""

from __future__ import annotations

from typing import Iterator, Optional

from megavl.config import Config, replace_field
from megavl.planning.capacity import Plan, PlanOptions, make_plan
from megavl.planning.hardware import Cluster


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _with_layout(config: Config, tp: int, pp: int, ep: int, first: Optional[int]) -> Config:
    for path, value in (
        ("parallel.tensor", tp),
        ("parallel.pipeline", pp),
        ("parallel.expert", ep),
        ("parallel.expert_tensor", 1),
        ("parallel.sequence_parallel", tp > 1),
        ("parallel.first_stage_lm_layers", first),
        ("parallel.distributed_optimizer", True),
    ):
        config = replace_field(config, path, value)
    return config


def _first_stage_choices(layers: int, pp: int) -> list[Optional[int]]:
    if pp == 1:
        return [None]
    choices: list[Optional[int]] = [None] if layers % pp == 0 else []
    return choices + [f for f in range(1, layers - pp + 2) if (layers - f) % (pp - 1) == 0 and f * pp != layers]


def candidate_plans(config: Config, cluster: Cluster, options: PlanOptions) -> Iterator[Plan]:
    """The best valid plan of each TP / PP / EP combination (fitting or not)."""
    world = cluster.world_size
    layers = config.model.lm.num_layers
    experts = config.model.lm.moe.num_experts
    tensor_sizes = [t for t in (1, 2, 4, 8, 16) if t <= cluster.gpus_per_node and cluster.gpus_per_node % t == 0]
    for tp in tensor_sizes:
        for pp in _divisors(layers):
            if world % (tp * pp):
                continue
            for ep in (_divisors(experts) if experts else [1]):
                plans = [make_plan(_with_layout(config, tp, pp, ep, first), cluster, options)
                         for first in _first_stage_choices(layers, pp)]
                valid = [p for p in plans if p.valid]
                if valid:
                    yield min(valid, key=lambda p: p.most_loaded.total)


def ranking_key(plan: Plan) -> tuple:
    p = plan.config.parallel
    return (round(plan.time.seconds, 9), p.tensor * p.pipeline, p.expert * p.expert_tensor, plan.most_loaded.total)


def suggest(config: Config, cluster: Cluster, options: PlanOptions = PlanOptions()) -> list[Plan]:
    """Plans that fit, best first."""
    return sorted((p for p in candidate_plans(config, cluster, options) if p.fits), key=ranking_key)
