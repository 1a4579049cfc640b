"""One optimizer step through megatron's forward-backward schedule.

The loss is the sum of per-token losses over the target tokens (the answers,
or all text under ``train.loss_scope: all_text``; "answer tokens" below). megatron's
``calculate_per_token_loss`` mode then divides the gradients by the number of
answer tokens in the whole step (all microbatches, all data-parallel ranks),
so every answer token weighs the same however the batch is split.

A step whose loss or gradients are not finite (NaN / inf, or no answer tokens
at all) is not applied: every rank learns it in one collective before the
optimizer runs, so no parameter, optimizer state or schedule changes
(``StepResult.nonfinite``); megavl/training/nonfinite.py decides when to stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megavl.config import Config
from megavl.models import inputs as model_inputs
from megavl.models.embedding_rows import zero_frozen_row_grads
from megavl.platform.distributed import collective_device
from megavl.platform.features import detect


@dataclass
class StepResult:
    loss: float  # mean loss per answer token over the whole step
    answer_tokens: int
    grad_norm: float
    lr: float
    skipped: bool  # no update was applied
    nonfinite: bool = False  # ... because the loss or a gradient was NaN / inf


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.to(torch.float32)])
    return loss_sum, num_tokens, {"lm loss": report}


def make_forward_step(config: Config):
    platform = detect()

    def forward_step(data_iterator: Iterator[dict], model):
        batch = model_inputs.to_device(next(data_iterator), config, platform.device)
        output = model_inputs.forward(model, batch, config, platform)
        return output, partial(_loss_func, batch["loss_mask"])

    return forward_step


def reduce_step_loss(losses: list[dict]) -> tuple[float, int]:
    """(mean answer-token loss, answer tokens) over all microbatches and DP ranks, on every rank."""
    device = detect().device
    # Summed on the device: the one read of the step's loss is the tolist below.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for item in losses:
        total += item["lm loss"].to(device, torch.float64)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    # Only the last pipeline stage computed losses; share them with the other stages.
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total,
            src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group(),
        )
    loss_sum, tokens = total.tolist()
    return (loss_sum / tokens if tokens else float("nan")), int(tokens)


def num_microbatches(config: Config, data_parallel: int) -> int:
    t = config.train
    return t.global_batch_size // (t.micro_batch_size * data_parallel)


def train_step(
    config: Config,
    model_chunks: list,
    optimizer,
    scheduler,
    data_iterator: Iterator[dict],
    microbatches: int,
    forward_step=None,
) -> StepResult:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step or make_forward_step(config),
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=microbatches,
        seq_length=config.train.seq_length,
        micro_batch_size=config.train.micro_batch_size,
        forward_only=False,
    )
    # train.embedding_rows_from: the rows below it get zero gradients, hence no update. Here the
    # gradients are reduced (megatron's finalize ran) and no optimizer has read them yet.
    zero_frozen_row_grads(config, model_chunks)
    loss, tokens = reduce_step_loss(losses)
    finite = _all_finite(model_chunks, loss)
    updated, grad_norm = False, None
    if finite:
        updated, grad_norm, _ = optimizer.step()
    if updated and scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(
        loss=loss,
        answer_tokens=tokens,
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        lr=optimizer.param_groups[0]["lr"],
        skipped=not updated,
        nonfinite=not finite,
    )


def _all_finite(model_chunks: list, loss: float) -> bool:
    """Whether the step's loss and every gradient are finite, agreed by all ranks (one all-reduce).

    The gradient buffers are checked after megatron's reduction: a NaN on any rank reaches the
    rank that owns that shard, and the flag's all-reduce tells every other rank."""
    # Accumulated on the device: one host sync for the whole check, not one per buffer.
    flag = torch.tensor([int(not math.isfinite(loss))], dtype=torch.int32, device=detect().device)
    for chunk in model_chunks:
        for buffer in list(chunk.buffers) + list(chunk.expert_parallel_buffers):
            flag |= (~torch.isfinite(buffer.grad_data).all()).to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())


def evaluate(config: Config, model_chunks: list, data, microbatches: int) -> float:
    """Mean answer-token loss over up to train.eval_steps steps of the validation batches ``data``
    (a StepBatches the caller builds afresh for each evaluation, so every one sees the same
    samples); closes it."""
    forward_step = make_forward_step(config)
    total_loss, total_tokens = 0.0, 0
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(config.train.eval_steps):
                batches = data.next_step()
                # Every rank must run the same number of schedules; stop when any rank ran dry.
                have = torch.tensor([len(batches) == microbatches], dtype=torch.int, device=collective_device())
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                if not have.item():
                    break
                losses = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=iter(batches),
                    model=model_chunks,
                    num_microbatches=microbatches,
                    seq_length=config.train.seq_length,
                    micro_batch_size=config.train.micro_batch_size,
                    forward_only=True,
                )
                loss, tokens = reduce_step_loss(losses)
                if tokens:
                    total_loss += loss * tokens
                    total_tokens += tokens
    finally:
        data.close()
        for chunk in model_chunks:
            chunk.train()
    return total_loss / total_tokens if total_tokens else float("nan")
