"""megatron's (distributed) AdamW and its warmup + cosine learning-rate schedule."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megavl.config import Config


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
    return get_megatron_optimizer(optimizer_config, model_chunks)


def build_scheduler(config: Config, optimizer) -> OptimizerParamScheduler:
    t = config.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
