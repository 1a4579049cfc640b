"""Activation recompute (perf.recompute_lm, perf.recompute_vision): a layer keeps only its
inputs after the forward, and the backward runs the layer again to get what it needs.

This is megavl's own full-layer recompute, not megatron's ``recompute_granularity: full``:
megatron's checkpoint keeps the layer's arguments with ``save_for_backward``, which takes
tensors only, and on GPUs the attention mask is a FlexAttention ``BlockMask``. torch's
non-reentrant checkpoint keeps Python arguments as they are and recomputes with them.

What a layer reads besides its arguments is set again for the recompute: the vision-token
flags (models/modality.py) live in a ContextVar, which the backward does not see. What its
forward records on the side happens once: router statistics and megatron's aux-loss log are
left as the first forward recorded them. torch's checkpoint restores the default CPU and CUDA
generators for the recompute; megatron's model-parallel generator is not restored, so
validate() refuses recompute with train.dropout > 0.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.checkpoint import checkpoint

from megavl.models import modality


@contextlib.contextmanager
def _side_effects_recorded_once() -> Iterator[None]:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megavl.models.moe import RouterStatistics

    tracker = get_moe_layer_wise_logging_tracker()
    logged = {name: entry["values"].clone() for name, entry in tracker.items() if "values" in entry}
    statistics, RouterStatistics.enabled = RouterStatistics.enabled, False
    try:
        yield
    finally:
        RouterStatistics.enabled = statistics
        for name, values in logged.items():
            tracker[name]["values"].copy_(values)


def recomputed(forward: Callable) -> Callable:
    """forward, with its activations recomputed in the backward when it runs with gradients."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        flags = modality.current_flags()
        runs = []

        def layer(*args, **kwargs):
            runs.append(None)
            with modality.restored(flags):
                if len(runs) == 1:
                    return forward(*args, **kwargs)
                with _side_effects_recorded_once():
                    return forward(*args, **kwargs)

        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    return run


def recompute_layers(layers: Iterable[torch.nn.Module]) -> int:
    """Makes each layer's forward recompute its activations in the backward; returns how many.

    The layers stay where they are (their parameters keep their names and checkpoint keys);
    only their forward is wrapped, behind their forward hooks (megatron's parameter gather)."""
    count = 0
    for layer in layers:
        layer.forward = recomputed(layer.forward)
        count += 1
    return count
