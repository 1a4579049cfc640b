"""Lets megatron-core's CUDA-only code paths run on a CPU-only torch.

megatron-core assumes a GPU in a handful of places: it allocates on
``torch.cuda.current_device()``, moves tensors with ``.cuda()`` or
``device="cuda"``, synchronises CUDA streams and events, seeds the CUDA RNG for
its model-parallel RNG tracker and checks ``tensor.type()`` against
``torch.cuda.*`` names. Rather than forking megatron-core, this module maps all
of those onto the CPU in one place, so the CPU back end runs the very same
megatron-core code (DDP, distributed optimizer, pipeline schedules, MoE
dispatchers, dist_checkpointing) as the GPU back end.

It is applied only when ``torch.cuda.is_available()`` is False, and ``apply()``
is idempotent. Nothing here changes numerics: every op still runs, on the CPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer means "accelerator <index>" to torch; here that is CUDA.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(value: Any) -> Any:
    return _CPU if _is_cuda_device(value) else value


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites every CUDA device argument of a torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept only 'torch.cuda.*Tensor' parameters.
            return args[0].type().replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: work on the CPU is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object, not an index: megatron allocates with
    # device=torch.cuda.current_device() inside autograd backward functions too,
    # where torch-function modes are not active.
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # The model-parallel RNG tracker forks "the CUDA generator"; on the CPU the
    # generator that dropout and init actually draw from is the CPU one.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed calls this; there are no CUDA generators to seed.
    cuda.manual_seed_all = lambda seed: None
    nvtx = cuda.nvtx
    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None


def _patch_all_to_all() -> None:
    """gloo's all_to_all_single takes split sizes as lists; megatron passes CPU tensors."""
    import torch.distributed as dist

    original = dist.all_to_all_single
    if getattr(original, "_megavl_lists", False):
        return

    def as_list(sizes):
        return sizes.tolist() if torch.is_tensor(sizes) else sizes

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)

    all_to_all_single._megavl_lists = True
    dist.all_to_all_single = all_to_all_single


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # moe_utils only defines te_general_gemm when Transformer Engine imports.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> bool:
    """Installs the CPU mappings when CUDA is absent. Returns whether they are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if not _APPLIED:
            _patch_torch_cuda()
            _patch_all_to_all()
            _patch_megatron()
            # Entered for the life of the process, deliberately never exited.
            _CudaDeviceToCpu().__enter__()
            _APPLIED = True
    return True


def is_applied() -> bool:
    return _APPLIED
