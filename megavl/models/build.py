"""Builds this rank's model chunk for the current pipeline stage and wraps it in megatron DDP."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megavl.config import Config
from megavl.platform import perf
from megavl.models.init import initialize_layout_invariant
from megavl.models.parts import freeze
from megavl.models.vlm import VisionLanguageModel
from megavl.platform.features import detect


def build_model(config: Config) -> VisionLanguageModel:
    """The unwrapped model for this rank's pipeline stage, initialised independently of the layout."""
    model = VisionLanguageModel(
        config,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    initialize_layout_invariant(model, config)
    return model


def wrap_for_training(config: Config, model: VisionLanguageModel) -> list[DistributedDataParallel]:
    """megatron DDP (contiguous gradient buffers, fp32 reduction) and the hooks its schedules use.

    The parts train.parts freezes are frozen first, so DDP gives them no gradient buffer
    (and the optimizer built from the chunks no state)."""
    freeze(config, model)
    if detect().cuda:
        model.cuda()
    data_parallel = ps.get_data_parallel_world_size()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=perf.overlap_grad_reduce(config, data_parallel).on,
        overlap_param_gather=perf.overlap_param_gather(config, data_parallel).on,
        bucket_size=config.perf.bucket_size,
        use_distributed_optimizer=perf.uses_distributed_optimizer(config),
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return [ddp]


@contextmanager
def parameters_gathered(chunks: list[DistributedDataParallel]) -> Iterator[None]:
    """Every rank's copy of the weights up to date with the last optimizer step, for the block.

    With perf.overlap_param_gather the distributed optimizer's updated shards are gathered
    bucket by bucket by forward pre-hooks in the next training forward, so until then a rank
    holds only its own shard's new values. What runs outside the training step (evaluation,
    task evaluation, a checkpoint save) runs in this block, as megatron-LM's loop does it: the
    pre-hooks are off and the weights gathered at once; the next step's forward finds them
    gathered. Without the overlap the optimizer step gathered them and this does nothing.
    """
    overlapped = [chunk for chunk in chunks if chunk.use_forward_hook]
    for chunk in overlapped:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in overlapped:
            chunk.enable_forward_pre_hook()


def local_parameter_counts(model: VisionLanguageModel) -> dict[str, int]:
    """Parameters this rank holds, per component (shards count at their local size).

    The whole model's counts, from the config alone, are
    ``megavl.models.param_count.total_parameter_counts``.
    """
    counts = {}
    for name in ("vision", "adapter", "language_model"):
        module = getattr(model, name, None)
        if module is not None:
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts
