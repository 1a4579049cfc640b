"""Builds this rank's model chunk for the current pipeline stage and wraps it in megatron DDP."""

from __future__ import annotations

from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megavl.config import Config
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
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        # Muon's distributed form shards whole weights over plain all-reduced gradients
        # (megavl/training/muon.py), not megatron's reduce-scattered buffers.
        use_distributed_optimizer=config.parallel.distributed_optimizer and config.train.optimizer != "muon",
    )
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    return [ddp]


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
