"""train.parts: what trains. Frozen parts stay bit-identical and hold no gradient buffer or
optimizer state; learning-rate multipliers scale exactly their part's update; a checkpoint
moves between stages that train different parts."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT

MOE = str(ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml")
DENSE = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
# One process; router losses off so a frozen router is the only thing that keeps it still.
MOE_OVERRIDES = ["parallel.expert=1", "train.warmup_steps=0"]


def _trainer(path, overrides, seed=0):
    from megavl.config import load_config
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import set_seed
    from megavl.training.optimizer import build_optimizer, build_scheduler

    config = load_config(path, overrides)
    set_seed(seed)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    scheduler = build_scheduler(config, optimizer)
    return config, model, chunks, optimizer, scheduler


def _train(trainer, steps, seed=7):
    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    config, _, chunks, optimizer, scheduler = trainer
    microbatches = num_microbatches(config, 1)
    batches = random_batches(config, microbatches * steps, seed=seed)
    for step in range(steps):
        train_step(config, chunks, optimizer, scheduler,
                   iter(batches[step * microbatches:(step + 1) * microbatches]), microbatches)


def _weights(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _optimizer_state_elements(optimizer) -> int:
    """Elements of fp32 main parameters the (distributed) optimizer keeps state for."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            total += sum(p.numel() for p in group["params"])
    return total


def test_every_parameter_belongs_to_one_part(megatron_world):
    from megavl.models.parts import PARTS, part_counts

    _, model, _, _, _ = _trainer(MOE, MOE_OVERRIDES)
    counts = part_counts(model)
    # Tied embeddings: no separate output layer in the tiny models.
    assert set(counts) == set(PARTS) - {"output_layer"}
    assert sum(total for _, total in counts.values()) == sum(p.numel() for p in model.parameters())


def test_frozen_parts_stay_identical_and_hold_no_gradient_buffer_or_optimizer_state(megatron_world):
    frozen = ["train.parts.vision.train=false", "train.parts.lm_embeddings.train=false",
              "train.parts.output_layer.train=false", "train.parts.router.train=false"]
    trainer = _trainer(MOE, [*MOE_OVERRIDES, *frozen])
    config, model, (chunk,), optimizer, _ = trainer
    from megavl.models.parts import part_of

    before = _weights(model)
    _train(trainer, steps=3)
    after = _weights(model)
    still = {"vision", "lm_embeddings", "router"}
    trainable_elements = 0
    for name, p in model.named_parameters():
        part = part_of(name, p)
        if part in still:
            assert not p.requires_grad, name
            assert torch.equal(before[name], after[name]), f"{name} ({part}) changed while frozen"
        else:
            assert p.requires_grad, name
            trainable_elements += p.numel()
    for part in ("adapter", "lm", "vision_lora"):
        assert any(not torch.equal(before[n], after[n]) for n, p in model.named_parameters() if part_of(n, p) == part), part
    # Memory, not just lr = 0: DDP's gradient buffers and the optimizer cover the trainable parts only.
    assert sum(buffer.numel_unpadded for buffer in chunk.buffers + chunk.expert_parallel_buffers) == trainable_elements
    assert _optimizer_state_elements(optimizer) == trainable_elements
    assert trainable_elements < sum(p.numel() for p in model.parameters())


def test_a_frozen_vision_tower_builds_no_autograd_graph(megatron_world):
    from megavl.data.random_samples import random_batches
    from megavl.models import inputs
    from megavl.platform.features import detect

    outputs = []
    for frozen in (False, True):
        config, model, _, _, _ = _trainer(DENSE, [f"train.parts.vision.train={str(not frozen).lower()}"])
        seen = []
        model.vision.register_forward_hook(lambda module, args, out: seen.append(out.requires_grad))
        batch = inputs.to_device(random_batches(config, 1, seed=3)[0], config, detect().device)
        assert batch["pixel_values"] is not None
        loss = inputs.forward(model, batch, config, detect()).sum()
        assert seen == [not frozen]
        loss.backward()  # the adapter after a frozen tower still gets gradients
        assert all(p.grad is not None or p.main_grad is not None for p in model.adapter.parameters())
        outputs.append(loss.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_vision_last_layers_trains_only_the_last_encoder_layers(megatron_world):
    config, model, _, _, _ = _trainer(DENSE, ["train.parts.vision_last_layers=1"])
    last = config.model.vision.num_layers - 1
    for name, p in model.vision.named_parameters():
        assert p.requires_grad == name.startswith(f"layers.{last}."), name


def test_a_learning_rate_multiplier_scales_exactly_its_parts_update(megatron_world):
    """Adam's first step moves each weight by lr * g / (|g| + eps) plus decoupled decay lr * wd * w:
    both linear in the learning rate, so the adapter's step at lr_mult 0.25 is a quarter of the one
    at 1, and every other part's step is unchanged."""
    from megavl.models.parts import part_of

    steps = {}
    for mult in (1.0, 0.25):
        trainer = _trainer(DENSE, ["train.warmup_steps=0", f"train.parts.adapter.lr_mult={mult}"])
        before = _weights(trainer[1])
        _train(trainer, steps=1)
        steps[mult] = {n: p.detach() - before[n] for n, p in trainer[1].named_parameters()}
    for name, p in trainer[1].named_parameters():
        if part_of(name, p) == "adapter":
            assert steps[1.0][name].abs().max() > 0
            # atol: a step is the difference of two fp32 weights, exact to their rounding (~1e-7 near 1).
            torch.testing.assert_close(steps[0.25][name], 0.25 * steps[1.0][name], rtol=1e-4, atol=2e-7, msg=name)
        else:
            # Not bitwise: the groups differ, so the gradient norm (for clipping) sums in another order.
            torch.testing.assert_close(steps[0.25][name], steps[1.0][name], rtol=1e-5, atol=2e-7, msg=name)


def test_a_checkpoint_moves_between_stages_that_train_different_parts(megatron_world, tmp_path):
    from megavl.training import checkpoint as ckpt

    root = str(tmp_path / "ckpt")
    frozen = _trainer(DENSE, ["train.parts.vision.train=false"])
    _train(frozen, steps=2)
    config, model, _, optimizer, scheduler = frozen
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), {"pos": 2})
    saved = _weights(model)

    from megavl.models.parts import trained_parts

    # Into a stage where the vision tower trains: weights restored, its optimizer starts fresh.
    training = _trainer(DENSE, [], seed=1)
    t_config, t_model, _, t_optimizer, t_scheduler = training
    state = ckpt.load_checkpoint(root, t_model, t_optimizer, t_scheduler, trained=trained_parts(t_config))
    assert state.step == 2
    for name, p in t_model.named_parameters():
        torch.testing.assert_close(p.detach(), saved[name], rtol=0, atol=0, msg=name)
    before = _weights(t_model)
    _train(training, steps=1, seed=11)
    assert any(not torch.equal(before[f"vision.{n}"], p) for n, p in t_model.vision.named_parameters())
    ckpt.save_checkpoint(root, t_config, t_model, t_optimizer, t_scheduler, ckpt.TrainState(step=3), {"pos": 3})

    # And back into a frozen stage: its vision tower is the trained one and stays so.
    back = _trainer(DENSE, ["train.parts.vision.train=false"], seed=2)
    b_config, b_model, _, b_optimizer, b_scheduler = back
    assert ckpt.load_checkpoint(root, b_model, b_optimizer, b_scheduler, trained=trained_parts(b_config)).step == 3
    loaded = _weights(b_model)
    _train(back, steps=1, seed=12)
    for name, p in b_model.vision.named_parameters():
        assert torch.equal(p.detach(), loaded[f"vision.{name}"])


@pytest.mark.parametrize("overrides, fragments", [
    (["train.parts.output_layer.lr_mult=2"], ["train.parts.output_layer", "model.lm.tie_embeddings = true"]),
    (["train.parts.vision_last_layers=9"], ["train.parts.vision_last_layers = 9", "[0, model.vision.num_layers = 4]"]),
    ([f"train.parts.{p}.train=false" for p in
      ("vision", "adapter", "lm", "lm_embeddings", "output_layer", "vision_lora", "router")],
     ["at least one part must train"]),
    (["train.parts.adapter.lr_mult=0"], ["train.parts.adapter.lr_mult = 0", "> 0"]),
], ids=["tied-embeddings-disagree", "too-many-vision-layers", "nothing-trains", "zero-lr-mult"])
def test_invalid_parts_are_refused_with_the_field(overrides, fragments):
    from megavl.config import ConfigError, load_config, validate

    config = load_config(DENSE, overrides)
    with pytest.raises(ConfigError) as info:
        validate(config, 1)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
