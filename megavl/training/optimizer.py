"""megatron's (distributed) AdamW, or Muon with AdamW beside it (megavl/training/muon.py), and
the learning-rate schedule: linear warmup, then cosine, linear, constant or WSD
(warmup-stable-decay) decay to train.min_lr."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavl.config import Config
from megavl.models.parts import optimizer_overrides


def build_optimizer(config: Config, model_chunks: list):
    t = config.train
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.dtype == "bf16",
        params_dtype=torch.bfloat16 if t.dtype == "bf16" else torch.float32,
        use_distributed_optimizer=config.parallel.distributed_optimizer,
    )
    overrides = _param_overrides(config, optimizer_config)
    if t.optimizer == "muon":
        from megavl.training.muon import build_muon_chain

        optimizer = build_muon_chain(config, model_chunks, optimizer_config, overrides)
    else:
        optimizer = get_megatron_optimizer(optimizer_config, model_chunks, config_overrides=overrides)
    _complete_torch_adam_state_init(optimizer)
    _expert_optimizer_uses_expert_tp_group(optimizer)
    return optimizer


def optimizer_form(config: Config, data_parallel: int, optimizer=None) -> dict:
    """What a saved optimizer state depends on beyond the parts (checkpoints record it): the
    optimizer, for Muon's layer-wise distributed state the DP size that assigned each rank
    its weights, and (given the optimizer) the distributed optimizer's gradient buckets."""
    layer_wise = config.train.optimizer == "muon" and config.parallel.distributed_optimizer
    form = {"optimizer": config.train.optimizer, "layer_wise_data_parallel": data_parallel if layer_wise else None}
    if optimizer is not None:
        form["gradient_buckets"] = gradient_buckets(optimizer)
    return form


def gradient_buckets(optimizer) -> Optional[list[list[int]]]:
    """The parameters per gradient bucket of each of the distributed optimizer's buffers; None
    without the distributed optimizer.

    Its state is saved bucket by bucket (dp-reshardable), so it loads only into the same
    buckets. perf.overlap_grad_reduce and perf.bucket_size decide them (megatron makes one
    bucket per buffer without the overlap); the DP size changes only their padding, which
    these counts leave out, so a checkpoint still loads at another DP size.
    """
    buckets = [[bucket.numel_unpadded for bucket in buffer.buckets]
               for inner in getattr(optimizer, "chained_optimizers", [optimizer])
               for buffer in getattr(inner, "buffers", [])]
    return buckets or None


def _expert_optimizer_uses_expert_tp_group(optimizer) -> None:
    """Counts each expert's gradient once in the gradient norm.

    megatron gives the expert-parameter optimizer the attention's TP group; when
    expert TP differs from attention TP (e.g. TP=2 with expert TP=1), the experts
    on TP rank 1 are then taken for TP duplicates and left out of the norm (and
    so out of clipping). The expert TP group is the one that describes them.
    """
    from megatron.core import parallel_state

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        groups = inner.param_groups
        if groups and all(group.get("is_expert_parallel", False) for group in groups):
            inner.tp_group = parallel_state.get_expert_tensor_parallel_group()


def _param_overrides(config: Config, optimizer_config: OptimizerConfig) -> dict:
    """megatron's usual groups (no decay on biases and norms) plus each part's multipliers
    (train.parts) and the vision adapters' own decay."""
    overrides = get_standard_config_overrides(optimizer_config)
    overrides.update(optimizer_overrides(config))
    return overrides


def _complete_torch_adam_state_init(optimizer) -> None:
    """Makes a fresh torch Adam state checkpoint-loadable.

    Without Transformer Engine or apex, megatron falls back to torch's AdamW,
    whose state also holds a per-parameter ``step``. megatron's state initialiser
    (used before loading a checkpoint into a fresh optimizer) leaves it out, and
    its state_dict then fails; add it.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(getattr(inner, "optimizer", None), torch.optim.Adam):
            continue
        original = inner.init_state_fn

        def init_state(opt, config=None, _original=original):
            _original(opt, config)
            for group in opt.param_groups:
                for param in group["params"]:
                    opt.state[param].setdefault("step", torch.tensor(0.0))

        inner.init_state_fn = init_state


def build_scheduler(config: Config, optimizer) -> OptimizerParamScheduler:
    t = config.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup() else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup(),
        lr_decay_steps=t.steps,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        wsd_decay_steps=t.wsd_decay_steps() if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style=t.wsd_decay_style if t.lr_decay_style == "WSD" else None,
    )


def initialize_state_for_loading(optimizer) -> None:
    """Creates (zero) optimizer state so a checkpoint's state can be loaded into it.

    megatron's distributed optimizer builds its loading state dict from the
    current state, which a fresh torch optimizer does not have yet.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(inner, "init_state_fn", None) is not None:
            inner.init_state_fn(inner.optimizer, inner.config)


def restore_adam_steps(optimizer) -> None:
    """Gives every parameter its own, correct Adam ``step`` after a checkpoint load.

    On the torch-optimizer path megatron keeps the step count in the param
    groups of its state dict, then restores one ``step`` tensor shared by all
    parameters and partly overwrites it while copying per-parameter state.
    torch's Adam increments each parameter's step in place and uses it for bias
    correction, so each parameter gets its own tensor, set from its group's count.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        if not isinstance(torch_optimizer, torch.optim.Adam):
            continue
        for group in torch_optimizer.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = torch_optimizer.state.get(param)
                if state is not None:
                    state["step"] = torch.tensor(float(group["step"]))
