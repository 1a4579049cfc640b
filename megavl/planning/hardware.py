"""The accelerators the planner knows: peak dense bf16 throughput and memory per GPU.

Peak throughput is NVIDIA's published dense (no 2:4 sparsity) BF16 tensor-core
figure for the SXM part. Memory is the total the driver reports for one GPU
(``nvidia-smi``'s MiB figure); the marketing capacity is given next to it.

| name | part                | peak bf16 dense | memory (driver)         | marketed |
|------|---------------------|-----------------|-------------------------|----------|
| h100 | H100 SXM5 80GB      |  989 TFLOP/s    |  81559 MiB = 79.6 GiB   |  80 GB   |
| h200 | H200 SXM 141GB      |  989 TFLOP/s    | 143771 MiB = 140.4 GiB  | 141 GB   |
| b200 | B200 (HGX) 180GB    | 2250 TFLOP/s    | 183359 MiB = 179.1 GiB  | 180 GB   |
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    part: str
    peak_bf16_dense_flops: float  # per second
    memory_bytes: int

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPUS: dict[str, GPU] = {
    "h100": GPU("h100", "NVIDIA H100 SXM5 80GB", 989e12, 81559 * MIB),
    "h200": GPU("h200", "NVIDIA H200 SXM 141GB", 989e12, 143771 * MIB),
    "b200": GPU("b200", "NVIDIA B200 180GB", 2250e12, 183359 * MIB),
}


def gpu_by_name(name: str) -> GPU:
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: GPU

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (f"{self.nodes} node(s) x {self.gpus_per_node} {self.gpu.part} = {self.world_size} GPUs "
                f"({self.gpu.memory_gib:.1f} GiB, {self.gpu.peak_bf16_dense_flops / 1e12:.0f} TFLOP/s "
                "bf16 dense each)")
