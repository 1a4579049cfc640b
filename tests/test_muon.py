"""train.optimizer: muon. megatron-core's Muon updates the 2-D weights of the language model,
its router and the adapter; AdamW the rest. One step agrees with the update written out by hand,
and the losses and gradient norms of 3 steps agree between one process and TP=2, EP=2 or DP=2
with the (layer-wise) distributed optimizer."""

from __future__ import annotations

import pytest
import torch

from conftest import NO_TASK_EVAL, ROOT, TINY_CONFIG, read_json, run_torchrun

MOE = str(ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml")
MUON = ["train.optimizer=muon", "train.warmup_steps=0", "train.clip_grad=0"]


def _trainer(path, overrides):
    from megavl.config import load_config
    from megavl.models.build import build_model, wrap_for_training
    from megavl.platform.distributed import set_seed
    from megavl.training.optimizer import build_optimizer, build_scheduler

    config = load_config(path, overrides)
    set_seed(0)
    model = build_model(config)
    chunks = wrap_for_training(config, model)
    optimizer = build_optimizer(config, chunks)
    return config, model, chunks, optimizer, build_scheduler(config, optimizer)


def _step(trainer, seed=7):
    from megavl.data.random_samples import random_batches
    from megavl.training.step import num_microbatches, train_step

    config, _, chunks, optimizer, scheduler = trainer
    microbatches = num_microbatches(config, 1)
    return train_step(config, chunks, optimizer, scheduler, iter(random_batches(config, microbatches, seed=seed)),
                      microbatches)


def _optimizer_of(optimizer) -> dict[int, str]:
    """id(parameter) -> "muon" or "adam", for every parameter some inner optimizer updates."""
    from megavl.training.muon import emerging_optimizers

    muon = emerging_optimizers()[0].Muon
    owner = {}
    for inner in optimizer.chained_optimizers:
        kind = "muon" if isinstance(inner.optimizer, muon) else "adam"
        for group in inner.optimizer.param_groups:
            for p in group["params"]:
                assert id(p) not in owner, "a parameter is in two optimizers"
                owner[id(p)] = kind
    return owner


def test_muon_takes_the_lm_and_adapter_matrices_and_adamw_everything_else(megatron_world):
    from megavl.models.parts import part_of

    _, model, _, optimizer, _ = _trainer(MOE, ["parallel.expert=1", *MUON])
    owner = _optimizer_of(optimizer)
    seen = {"muon": set(), "adam": set()}
    for name, p in model.named_parameters():
        part = part_of(name, p)
        want = "muon" if (p.dim() == 2 and part in ("lm", "router", "adapter")) else "adam"
        assert owner.get(id(p)) == want, f"{name} ({part}, {tuple(p.shape)}): {owner.get(id(p))}, want {want}"
        seen[want].add(part)
    # Experts, attention, router and adapter matrices use Muon; the tower, LoRA, embeddings and
    # every norm and bias use AdamW.
    assert seen["muon"] == {"lm", "router", "adapter"}
    assert {"vision", "vision_lora", "lm_embeddings", "lm"} <= seen["adam"]


def test_one_muon_step_is_the_orthogonalised_momentum_scaled_and_decayed(megatron_world):
    from emerging_optimizers.orthogonalized_optimizers import get_muon_scale_factor
    from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz

    lr, wd, beta = 0.01, 0.1, 0.9
    trainer = _trainer(str(TINY_CONFIG), [*MUON, f"train.lr={lr}", f"train.weight_decay={wd}",
                                          f"train.muon.momentum={beta}", "train.muon.lr_mult=0.5"])
    config, model, _, _, _ = trainer
    names = {"language_model.decoder.layers.0.mlp.linear_fc2.weight": 0.5,  # Muon, at lr_mult 0.5
             "adapter.linear_fc1.weight": 0.5}
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in names}
    result = _step(trainer)
    assert not result.skipped
    for name, mult in names.items():
        p = params[name]
        grad = p.main_grad.detach().clone()  # the step's (reduced) gradient, still in DDP's buffer
        momentum = (1 - beta) * grad  # the buffer after one step from zero
        nesterov = grad.lerp(momentum, beta)
        rows, cols = p.shape
        update = newton_schulz(nesterov, steps=5) * get_muon_scale_factor(rows, cols, "spectral") * 0.2
        expected = before[name] * (1 - lr * mult * wd) - lr * mult * update
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)
    del config


def test_a_resumed_muon_run_continues_exactly_and_an_adamw_checkpoint_starts_muon_fresh(megatron_world, tmp_path,
                                                                                       caplog):
    from megavl.training import checkpoint as ckpt
    from megavl.training.optimizer import optimizer_form

    overrides = ["parallel.expert=1", *MUON]
    first = _trainer(MOE, overrides)
    config, model, _, optimizer, scheduler = first
    for seed in (1, 2):
        _step(first, seed=seed)
    root = str(tmp_path / "muon")
    ckpt.save_checkpoint(root, config, model, optimizer, scheduler, ckpt.TrainState(step=2), None)
    _step(first, seed=3)
    want = {name: p.detach().clone() for name, p in model.named_parameters()}

    second = _trainer(MOE, overrides)
    _, model2, _, optimizer2, scheduler2 = second
    form = optimizer_form(config, 1)
    assert form == {"optimizer": "muon", "layer_wise_data_parallel": 1}
    assert ckpt.load_checkpoint(root, model2, optimizer2, scheduler2, form=form).step == 2
    _step(second, seed=3)
    for name, p in model2.named_parameters():
        assert torch.equal(p.detach(), want[name]), f"{name} differs after resuming"

    # Stage chaining from AdamW to Muon: weights and schedule load, the optimizer starts fresh.
    adam = _trainer(MOE, ["parallel.expert=1"])
    _step(adam, seed=1)
    adam_root = str(tmp_path / "adamw")
    ckpt.save_checkpoint(adam_root, adam[0], adam[1], adam[3], adam[4], ckpt.TrainState(step=0), None)
    third = _trainer(MOE, overrides)
    with caplog.at_level("WARNING"):
        ckpt.load_checkpoint(adam_root, third[1], third[3], third[4], form=form)
    assert "optimizer state of the form {'optimizer': 'adamw'" in caplog.text
    for name, p in third[1].named_parameters():
        assert torch.equal(p.detach(), dict(adam[1].named_parameters())[name].detach())


@pytest.mark.parametrize("distributed", [True, False], ids=["layer-wise", "replicated"])
def test_muon_in_bf16_keeps_fp32_master_weights_and_trains(megatron_world, distributed):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    trainer = _trainer(MOE, ["parallel.expert=1", *MUON, "train.dtype=bf16",
                             f"parallel.distributed_optimizer={str(distributed).lower()}"])
    _, model, _, optimizer, _ = trainer
    assert all(isinstance(inner, Float16OptimizerWithFloat16Params) for inner in optimizer.chained_optimizers)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = [_step(trainer, seed=seed) for seed in (1, 2)]
    assert all(not r.skipped for r in results) and results[1].loss < results[0].loss + 1.0
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert any("linear_fc1" in name for name in changed) and any("vision" in name for name in changed)


def test_muon_refuses_bad_settings_with_the_field_named():
    from megavl.config import ConfigError, load_config, validate

    config = load_config(str(TINY_CONFIG), ["train.optimizer=muon", "train.muon.momentum=1.0",
                                             "train.muon.ns_steps=0", "train.muon.tp_mode=rowwise"])
    with pytest.raises(ConfigError) as error:
        validate(config, world_size=1)
    text = str(error.value)
    assert "train.muon.momentum = 1.0: must be in [0, 1)" in text
    assert "train.muon.ns_steps" in text
    assert "train.muon.tp_mode = 'rowwise': must be one of duplicated, distributed, blockwise" in text


COMMON = ["train.micro_batch_size=1", "train.global_batch_size=4", "train.seq_length=256", *MUON,
          "train.clip_grad=1.0"]
LAYOUTS = {
    "TP2": (TINY_CONFIG, 2, ["parallel.tensor=2"]),
    "TP2-distributed-NS": (TINY_CONFIG, 2, ["parallel.tensor=2", "train.muon.tp_mode=distributed"]),
    "DP2-layer-wise": (TINY_CONFIG, 2, ["parallel.distributed_optimizer=true"]),
    "PP2": (TINY_CONFIG, 2, ["parallel.pipeline=2", NO_TASK_EVAL]),
    "MoE-EP2": (MOE, 2, ["parallel.expert=2"]),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    work = tmp_path_factory.mktemp("muon")
    results = {}
    for config in {str(c) for c, _, _ in LAYOUTS.values()}:
        key = "moe" if config == MOE else "dense"
        extra = ["parallel.expert=1"] if config == MOE else []
        run_torchrun(1, "train_layout.py", ["--config", config, "--set", *COMMON, *extra,
                                            "--save-init", str(work / f"init-{key}"), "--out", str(work / f"{key}.json")])
        results[config] = (work / f"init-{key}", read_json(work / f"{key}.json"))
    return work, results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_muon_layout_matches_one_process(references, name):
    work, results = references
    config, processes, overrides = LAYOUTS[name]
    init, single = results[str(config)]
    out = work / f"{name}.json"
    run_torchrun(processes, "train_layout.py", ["--config", str(config), "--set", *COMMON, *overrides,
                                                "--init", str(init), "--out", str(out)])
    result = read_json(out)
    assert result["answer_tokens"] == single["answer_tokens"]
    for key in ("loss", "grad_norm"):
        for step, (got, want) in enumerate(zip(result[key], single[key])):
            assert got == pytest.approx(want, rel=1e-5), f"{name} {key} at step {step}: {got} vs {want}"
