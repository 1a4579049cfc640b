"""The accelerators the planner knows: peak dense bf16 throughput and memory per GPU.

Peak throughput is NVIDIA's published dense (no 2:4 sparsity) BF16 tensor-core
figure for the SXM part. Memory is the total the driver reports for one GPU
(``nvidia-smi``'s MiB figure); the marketing capacity is given next to it. A
training run finds its row by CUDA device name (``gpu_by_device_name``) for the
MFU it logs.

| name | part                | peak bf16 dense | memory (driver)         | marketed |
|------|---------------------|-----------------|-------------------------|----------|
| h100 | H100 SXM5 80GB      |  989 TFLOP/s    |  81559 MiB = 79.6 GiB   |  80 GB   |
| h200 | H200 SXM 141GB      |  989 TFLOP/s    | 143771 MiB = 140.4 GiB  | 141 GB   |
| b200 | B200 (HGX) 180GB    | 2250 TFLOP/s    | 183359 MiB = 179.1 GiB  | 180 GB   |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


def gpu_by_device_name(device_name: str) -> Optional[GPU]:
    """The GPU of a CUDA device name (``torch.cuda.get_device_name()``, e.g. "NVIDIA H100 80GB
    HBM3"), or None for a part the table does not hold. The PCIe and NVL variants, and the Grace
    superchips (GH200, GB200), have other clocks and peaks than the SXM parts above."""
    words = device_name.upper().replace("-", " ").split()
    if "PCIE" in words or "NVL" in words:
        return None
    for key, gpu in GPUS.items():
        if key.upper() in words:
            return gpu
    return None


def peak_flops(device_name: Optional[str], dtype: str) -> Optional[float]:
    """Peak dense FLOP/s of one GPU for a run of this train.dtype, or None where it is not known:
    no GPU, a GPU the table does not hold, or fp32 (whose throughput depends on TF32 being
    allowed). A bf16 run with train.fp8 is measured against the bf16 peak too."""
    gpu = gpu_by_device_name(device_name) if device_name else None
    if gpu is None or dtype != "bf16":
        return None
    return gpu.peak_bf16_dense_flops


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
