"""What trains: the model's parts, freezing them, and their optimizer groups.

Every parameter belongs to exactly one part (``part_of``), named as in
``train.parts``. ``freeze`` turns off ``requires_grad`` for the parts that do not
train before megatron's DDP wraps the model, so they get no gradient buffer and
the (distributed) optimizer holds no state for them. ``optimizer_overrides``
gives each part its learning-rate and weight-decay multipliers as megatron
param-group overrides (``max_lr`` / ``min_lr`` scale the whole schedule, warmup
included; ``wd_mult`` scales the decay of the parameters that decay at all).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from megavl.config import TRAINABLE_PARTS as PARTS
from megavl.config import Config, PartConfig

_VISION_LAYER = re.compile(r"^vision\.layers\.(\d+)\.")


def _plain(name: str) -> str:
    """The parameter's name inside VisionLanguageModel (without DDP / fp16 wrappers' prefixes)."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def part_of(name: str, param: Optional[torch.nn.Parameter] = None) -> str:
    """The part a parameter belongs to, from its name (and its vision-LoRA mark)."""
    name = _plain(name)
    if (param is not None and getattr(param, "vision_lora", False)) or name.endswith(("lora_a", "lora_b")):
        return "vision_lora"
    if name.startswith("vision."):
        return "vision"
    if name.startswith("adapter."):
        return "adapter"
    if name.startswith("language_model.embedding."):
        return "lm_embeddings"
    if name.startswith("language_model.output_layer."):
        return "output_layer"
    if ".mlp.router." in name:
        return "router"
    if name.startswith("language_model."):
        return "lm"
    raise ValueError(f"parameter {name!r} belongs to no part of the model (parts: {', '.join(PARTS)})")


def part_config(config: Config, part: str) -> PartConfig:
    return getattr(config.train.parts, part)


def trains(config: Config, name: str, param: torch.nn.Parameter) -> bool:
    """Whether this parameter trains under config.train.parts."""
    part = part_of(name, param)
    if not part_config(config, part).train:
        return False
    if part == "vision_lora" and not config.model.lm.vision_lora.enabled:
        return False
    last = config.train.parts.vision_last_layers
    if part == "vision" and last is not None:
        match = _VISION_LAYER.match(_plain(name))
        # The patch embedding feeds the first layer: frozen whenever any layer is.
        if match is None:
            return last >= config.model.vision.num_layers
        return int(match.group(1)) >= config.model.vision.num_layers - last
    return True


def freeze(config: Config, model: torch.nn.Module) -> None:
    """Sets requires_grad per config.train.parts (before DDP wraps the model)."""
    for name, param in model.named_parameters():
        param.requires_grad_(trains(config, name, param))


def part_counts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{part: (trainable, total)} parameter counts on this rank."""
    counts = {part: [0, 0] for part in PARTS}
    for name, param in model.named_parameters():
        counted = counts[part_of(name, param)]
        counted[0] += param.numel() if param.requires_grad else 0
        counted[1] += param.numel()
    return {part: (trained, total) for part, (trained, total) in counts.items() if total}


def trained_parts(config: Config) -> dict:
    """What trains and how, as plain data a checkpoint records: optimizer state saved under
    other settings (other parts, other param groups) does not fit this run's optimizer."""
    import dataclasses

    record = dataclasses.asdict(config.train.parts)
    record["vision_lora"]["train"] = record["vision_lora"]["train"] and config.model.lm.vision_lora.enabled
    # Moments built while every embedding row trained would move the rows this run keeps fixed.
    record["embedding_rows_from"] = config.train.embedding_rows_from
    return record


def describe(counts: dict[str, tuple[int, int]]) -> str:
    """One line: what trains and what is frozen on this rank."""
    def state(trained: int, total: int) -> str:
        if trained == total:
            return "trains"
        return "frozen" if trained == 0 else f"{trained:,d} of {total:,d} train"

    return "trainable parts: " + ", ".join(f"{part} {state(*counts[part])}" for part in PARTS if part in counts)


def optimizer_overrides(config: Config) -> dict:
    """megatron ParamKey -> ParamGroupOverride for the parts whose multipliers are not 1."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    t = config.train
    lora_decay = config.model.lm.vision_lora.weight_decay / t.weight_decay if t.weight_decay > 0 else 1.0
    overrides = {}
    for part in PARTS:
        settings = part_config(config, part)
        if settings.lr_mult != 1.0:
            key = ParamKey(with_name_predicate=ParamWithNamePredicate(
                name=f"part_{part}_lr", fn=_in_part(part)))
            overrides[key] = ParamGroupOverride(max_lr=t.lr * settings.lr_mult, min_lr=t.min_lr * settings.lr_mult)
        wd_mult = settings.wd_mult * (lora_decay if part == "vision_lora" else 1.0)
        if wd_mult != 1.0:
            # Only parameters that decay: megatron's own override gives biases and norms wd_mult 0.
            key = ParamKey(with_name_predicate=ParamWithNamePredicate(
                name=f"part_{part}_wd", fn=_in_part(part, decaying_only=True)))
            overrides[key] = ParamGroupOverride(wd_mult=wd_mult)
    return overrides


def _in_part(part: str, decaying_only: bool = False):
    def matches(param: torch.nn.Parameter, name: str) -> bool:
        if decaying_only and (len(param.shape) == 1 or name.endswith(".bias")):
            return False
        return part_of(name, param) == part

    return matches
