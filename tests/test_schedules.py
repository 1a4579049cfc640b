"""The learning-rate schedule per stage: warmup by steps or by fraction, then megatron's cosine,
linear, constant or WSD decay to min_lr, each part scaled by its lr_mult."""

from __future__ import annotations

import math

import pytest

from conftest import TINY_CONFIG

STEPS, LR, MIN_LR = 20, 1e-3, 1e-5


def _expected(style: str, step: int, warmup: int, anneal: int = 0) -> float:
    if warmup and step <= warmup:
        return LR * step / warmup
    progress = (step - warmup) / (STEPS - warmup)
    if style == "cosine":
        return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)
    if style == "linear":
        return MIN_LR + (1 - progress) * (LR - MIN_LR)
    if style == "constant":
        return LR
    start = STEPS - anneal  # WSD, linear anneal
    return LR if step <= start else MIN_LR + (1 - (step - start) / anneal) * (LR - MIN_LR)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "WSD"])
def test_each_decay_style_follows_its_formula_and_scales_with_the_parts_multiplier(megatron_world, style):
    from megavl.config import load_config
    from megavl.models.build import build_model, wrap_for_training
    from megavl.training.optimizer import build_optimizer, build_scheduler

    config = load_config(str(TINY_CONFIG), [
        f"train.steps={STEPS}", f"train.lr={LR}", f"train.min_lr={MIN_LR}", "train.warmup_fraction=0.25",
        f"train.lr_decay_style={style}", "train.wsd_decay_fraction=0.2", "train.parts.adapter.lr_mult=0.5"])
    assert config.train.warmup() == 5
    optimizer = build_optimizer(config, wrap_for_training(config, build_model(config)))
    scheduler = build_scheduler(config, optimizer)
    groups = optimizer.param_groups
    scaled = [g for g in groups if g.get("max_lr") == LR * 0.5]
    plain = [g for g in groups if g.get("max_lr") == LR]
    assert scaled and plain
    for step in range(1, STEPS + 1):
        scheduler.step(increment=1)
        want = _expected(style, step, warmup=5, anneal=4)
        for group in plain:
            assert group["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), (style, step)
        for group in scaled:
            assert group["lr"] == pytest.approx(0.5 * want, rel=1e-9, abs=1e-15), (style, step)


@pytest.mark.parametrize("overrides, fragment", [
    (["train.warmup_fraction=1.5"], "train.warmup_fraction = 1.5: must be in [0, 1]"),
    (["train.lr_decay_style=WSD", "train.wsd_decay_fraction=0"], "train.wsd_decay_fraction = 0"),
    (["train.lr_decay_style=WSD", "train.warmup_fraction=0.9", "train.wsd_decay_fraction=0.2"],
     "must fit in train.steps"),
    (["train.lr_decay_style=exponential"], "train.lr_decay_style = 'exponential'"),
], ids=["warmup-fraction", "wsd-zero", "wsd-too-long", "unknown-style"])
def test_bad_schedules_are_refused_with_the_field(overrides, fragment):
    from megavl.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError) as info:
        validate(load_config(str(TINY_CONFIG), overrides), 1)
    assert fragment in str(info.value), str(info.value)
