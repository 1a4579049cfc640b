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
Every name it replaces must already exist (``_replace``): should a newer
megatron-core or torch rename one, ``apply()`` fails naming it rather than
leaving a patch that silently does nothing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_LOCK = threading.Lock()
_CPU = torch.device("cpu")
# How many of megatron's tensor-type checks are running (see _cuda_type_names).
_TYPE_CHECKS_RUNNING = 0


def _replace(owner: Any, name: str, value: Any) -> None:
    """owner.name = value, for a name owner already has: a renamed target fails here, loudly."""
    if not hasattr(owner, name):
        where = getattr(owner, "__module__", None) if isinstance(owner, type) else None
        label = f"{where}.{owner.__qualname__}" if where else getattr(owner, "__name__", repr(owner))
        raise RuntimeError(
            f"megavl.platform.cpu_compat: {label} has no attribute {name!r} to replace; the installed "
            f"version of {label.split('.')[0]} no longer matches the CPU compatibility layer"
        )
    setattr(owner, name, value)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """While active, ``tensor.type()`` spells CPU tensors as CUDA ones ('torch.cuda.FloatTensor')."""
    global _TYPE_CHECKS_RUNNING
    _TYPE_CHECKS_RUNNING += 1
    try:
        yield
    finally:
        _TYPE_CHECKS_RUNNING -= 1


def _with_cuda_type_names(func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return func(*args, **kwargs)

    wrapper._megavl_cuda_type_names = True
    return wrapper


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
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and _TYPE_CHECKS_RUNNING:
            # Only inside the megatron functions that insist on 'torch.cuda.*Tensor' (_patch_megatron).
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
    # Each name gets a function object of its own: torch.compile's trace rules
    # map torch functions by identity and reject one object under two names.
    # A device object, not an index: megatron allocates with
    # device=torch.cuda.current_device() inside autograd backward functions too,
    # where torch-function modes are not active.
    _replace(cuda, "current_device", lambda: _CPU)
    for name in ("set_device", "synchronize", "reset_peak_memory_stats"):
        _replace(cuda, name, lambda *a, **k: None)
    _replace(cuda, "empty_cache", lambda: None)
    _replace(cuda, "Stream", _NoOpStream)
    _replace(cuda, "Event", _NoOpStream)
    _replace(cuda, "current_stream", lambda *a, **k: _NoOpStream())
    _replace(cuda, "default_stream", lambda *a, **k: _NoOpStream())
    _replace(cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        _replace(cuda, name, lambda *a, **k: 0)
    # The model-parallel RNG tracker forks "the CUDA generator"; on the CPU the
    # generator that dropout and init actually draw from is the CPU one.
    _replace(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    _replace(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))
    # torch.manual_seed calls this; there are no CUDA generators to seed.
    _replace(cuda, "manual_seed_all", lambda seed: None)
    _replace(cuda.nvtx, "range_push", lambda *a, **k: None)
    _replace(cuda.nvtx, "range_pop", lambda *a, **k: None)


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
    _replace(dist, "all_to_all_single", all_to_all_single)


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    _replace(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _replace(mp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))

    # moe_utils refers to te_general_gemm (in the router's gating GEMM) but only
    # defines it when Transformer Engine imports; None selects its torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        if "te_general_gemm" not in moe_utils.RouterGatingLinearFunction.forward.__code__.co_names:
            raise RuntimeError(
                "megavl.platform.cpu_compat: megatron.core.transformer.moe.moe_utils."
                "RouterGatingLinearFunction.forward no longer refers to 'te_general_gemm'; "
                "the CPU compatibility layer no longer matches the installed megatron-core"
            )
        moe_utils.te_general_gemm = None

    # megatron's optimizers accept only parameters whose tensor.type() is
    # 'torch.cuda.{Float,Half,BFloat16}Tensor' (and clipping asserts it of the
    # gradients). The check is a plain string comparison inside these functions,
    # so they are the narrowest scope there is: tensor.type() keeps its own
    # answer everywhere else.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    for owner in (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        _replace(owner, "__init__", _with_cuda_type_names(owner.__init__))
    # optimizer.py calls clipping by the name it imported.
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    for owner in (clip_grads, optimizer):
        _replace(owner, "clip_grad_by_total_norm_fp32", clip)


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
