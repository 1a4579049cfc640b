"""Process-group and megatron parallel-state set-up from torchrun's environment."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np

import torch
import torch.distributed as dist

from megavl.config import Config, data_parallel_size, validate
from megavl.platform import cpu_compat
from megavl.platform.features import detect


@dataclass(frozen=True)
class Layout:
    """Where this rank sits in the parallel grid."""

    world_size: int
    rank: int
    tensor: int
    pipeline: int
    expert: int
    data: int
    tensor_rank: int
    pipeline_rank: int
    data_rank: int

    def describe(self) -> str:
        return (
            f"parallel layout: world={self.world_size} = TP {self.tensor} x PP {self.pipeline} x "
            f"DP {self.data} (EP {self.expert})"
        )


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor given to a collective of ``group`` must live: NCCL moves only GPU memory
    (the process's own GPU, set at start-up), gloo only host memory."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(config: Config, timeout_minutes: int = 10) -> Layout:
    """Validates the config for this world size, then creates the process groups.

    Works both under torchrun and as a plain single process (a world of one).
    """
    world_size = world_size_from_env()
    validate(config, world_size)

    platform = detect()
    if not platform.cuda:
        cpu_compat.apply()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        if platform.cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "MASTER_ADDR" not in os.environ:
            # A plain `python script.py` run: a single-process group on loopback.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=platform.distributed_backend,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )

    from megatron.core import parallel_state as ps

    p = config.parallel
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            expert_model_parallel_size=p.expert,
            expert_tensor_parallel_size=p.expert_tensor,
            context_parallel_size=p.context,
        )
    return current_layout(config)


def current_layout(config: Config) -> Layout:
    from megatron.core import parallel_state as ps

    world_size = dist.get_world_size()
    return Layout(
        world_size=world_size,
        rank=dist.get_rank(),
        tensor=config.parallel.tensor,
        pipeline=config.parallel.pipeline,
        expert=config.parallel.expert,
        data=data_parallel_size(config, world_size),
        tensor_rank=ps.get_tensor_model_parallel_rank(),
        pipeline_rank=ps.get_pipeline_model_parallel_rank(),
        data_rank=ps.get_data_parallel_rank(),
    )


def set_seed(seed: int) -> None:
    """Seeds every generator the same way megatron's trainer does.

    The pipeline rank is mixed in so stages do not draw identical dropout masks;
    megatron's tracker derives the tensor-parallel streams from the same seed.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
