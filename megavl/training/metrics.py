"""Training numbers: what one step reports, and where it goes (TensorBoard events,
metrics.jsonl and one console line per step).

Only one rank writes (the caller decides which); the others get a writer that
does nothing, so the training loop needs no rank checks.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megavl.config import Config
from megavl.models.flops import microbatch_flops
from megavl.models.inputs import PAD_DOCUMENT_ID
from megavl.platform.distributed import collective_device


@dataclass(frozen=True)
class StepTotals:
    """What the step computed, over the whole DP group."""

    tokens: int  # non-padding tokens
    model_flops: float  # training FLOPs of the microbatches (megavl.models.flops)


def step_totals(batches: list[dict], config: Config, group) -> StepTotals:
    """Non-padding tokens and model FLOPs of the whole step: this rank's microbatches, summed over
    the DP group (the TP / PP ranks of one DP rank share its microbatches) in one all-reduce."""
    tokens = sum(int((b["document_ids"] != PAD_DOCUMENT_ID).sum()) for b in batches)
    flops = sum(microbatch_flops(b, config).total for b in batches)
    # float64 holds token counts exactly up to 2**53, so one pair carries both.
    totals = torch.tensor([tokens, flops], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(totals, group=group)
    tokens, flops = totals.tolist()
    return StepTotals(int(tokens), flops)


def step_metrics(result, tokens: int, step_time: float, data_stats, balance, max_pixels: Optional[int],
                 moe_scalars: Optional[dict], skipped_steps: int = 0, model_flops: Optional[float] = None,
                 world_size: int = 1, peak_flops: Optional[float] = None) -> dict:
    """The scalars one training step logs (console, metrics.jsonl, TensorBoard).

    model_flops: the step's (all DP ranks); with it the step logs tflops_per_gpu (per GPU of the
    world_size, over the whole step time, data loading included as in tokens_per_s) and, given the
    GPU's peak FLOP/s, mfu (a fraction of that peak).
    """
    metrics = {
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "answer_tokens": result.answer_tokens,
        "tokens": tokens,
        "tokens_per_s": tokens / step_time,
    }
    if model_flops is not None:
        per_gpu = model_flops / step_time / world_size
        metrics["tflops_per_gpu"] = per_gpu / 1e12
        if peak_flops:
            metrics["mfu"] = per_gpu / peak_flops
    metrics.update({
        "packing_efficiency": data_stats.packing_efficiency,
        "skipped_samples": sum(data_stats.skipped.values()),
        # Steps not applied because their loss or gradients were not finite, since the run began.
        "skipped_steps": skipped_steps,
    })
    metrics.update({f"skipped/{reason}": n for reason, n in sorted(data_stats.skipped.items())})
    if balance is not None:
        metrics.update(vision_imbalance=balance.imbalance_after, vision_imbalance_unbalanced=balance.imbalance_before,
                       balance_moved_fraction=balance.moved_fraction)
    if max_pixels:
        metrics["max_pixels"] = max_pixels
    metrics["step_time"] = step_time
    metrics.update(moe_scalars or {})
    return metrics


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class MetricsWriter:
    def __init__(self, log_dir: str, total_steps: int, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_dir = log_dir
        self.stream = stream or sys.stdout
        self._tensorboard = None
        self._jsonl = None
        self._started = time.monotonic()
        self._first_step: Optional[int] = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self._tensorboard = SummaryWriter(log_dir=os.path.join(log_dir, "tensorboard"))
            self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)

    def log_step(self, step: int, metrics: dict) -> None:
        """Writes one step's scalars everywhere and prints the progress line (step counts from 1)."""
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step = step - 1
            self._started = time.monotonic() - metrics.get("step_time", 0.0)
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(f"train/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._print_progress(step, metrics)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"val/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, **{f"val_{k}": v for k, v in metrics.items()}}) + "\n")
        shown = " | ".join(f"val {k} {v:.4f}" for k, v in metrics.items())
        print(f"step {step:>{len(str(self.total_steps))}}/{self.total_steps} | {shown}", file=self.stream, flush=True)

    def log_tasks(self, step: int, results) -> None:
        """Task accuracy (megavl/eval/task_eval.py TaskResults): scalars under task/ in
        TensorBoard and metrics.jsonl, the table on the console, example answers as text."""
        if not self.enabled:
            return
        metrics = results.metrics()
        for name, value in metrics.items():
            self._tensorboard.add_scalar(f"task/{name}", value, step)
        if results.examples:
            rows = ["| task | question | answer | reference |", "|---|---|---|---|"]
            rows += [f"| {e['task']} | {_cell(e['question'])} | {_cell(e['answer'])} | {_cell(e['reference'])} |"
                     for e in results.examples]
            self._tensorboard.add_text("task/examples", "\n".join(rows), step)
        self._jsonl.write(json.dumps({"step": step, **{f"task_{k}": v for k, v in metrics.items()},
                                      "task_skipped": results.skipped}, ensure_ascii=False) + "\n")
        width = len(str(self.total_steps))
        print(f"step {step:>{width}}/{self.total_steps} | task accuracy\n{results.table()}", file=self.stream, flush=True)

    def log_image(self, tag: str, image_hwc, step: int) -> None:
        if self.enabled:
            self._tensorboard.add_image(tag, image_hwc, step, dataformats="HWC")

    def log_record(self, step: int, record: dict) -> None:
        """Non-scalar data (e.g. per-layer expert load) as one more line of metrics.jsonl."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, **record}) + "\n")

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _print_progress(self, step: int, m: dict) -> None:
        done = step - self._first_step
        elapsed = time.monotonic() - self._started
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        width = len(str(self.total_steps))
        parts = [
            f"step {step:>{width}}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"grad {m['grad_norm']:.3f}",
            f"{m['tokens_per_s']:.0f} tok/s",
        ]
        if "tflops_per_gpu" in m:
            parts.append(f"{m['tflops_per_gpu']:.3g} TFLOP/s/GPU")
        if "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        if "packing_efficiency" in m:
            parts.append(f"pack {100 * m['packing_efficiency']:.0f}%")
        if "moe_load_balancing_loss" in m:
            parts.append(f"aux {m['moe_load_balancing_loss']:.3f}")
        parts += [f"{m['step_time']:.2f} s/step", f"ETA {format_duration(eta)}"]
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def _cell(text: str) -> str:
    """Text inside a markdown table cell (TensorBoard renders text summaries as markdown)."""
    return text.replace("|", "\\|").replace("\n", " ")
