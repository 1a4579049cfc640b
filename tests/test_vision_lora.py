"""Vision-only LoRA: exact no-op at initialisation, vision rows only, through MoE dispatch too."""

from __future__ import annotations

import random

import pytest
import torch

from megavl.config import load_config
from megavl.data.batch import collate_rows, pack_row
from megavl.data.random_samples import random_sample
from megavl.models.inputs import attention_mask_for
from megavl.models.inputs import to_device as model_inputs

from conftest import ROOT

MOE_CONFIG = ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml"


def _config(*overrides):
    return load_config(str(MOE_CONFIG), ["parallel.expert=1", "train.seq_length=256", *overrides])


def _model(config):
    from megavl.models.build import build_model

    return build_model(config)


def _batch(config, max_images=2, seed=4):
    rng = random.Random(seed)
    samples = [random_sample(rng, config, max_images=max_images) for _ in range(2)]
    if max_images:
        assert any(s.images for s in samples)
    row = pack_row(samples, config.train.seq_length, config.model.lm.image_token_id, 2)
    return model_inputs(collate_rows([row]), config, torch.device("cpu"))


def _logits(model, batch):
    mask = attention_mask_for(batch, True, "sdpa")
    return model(batch["tokens"], batch["position_ids"], mask, pixel_values=batch["pixel_values"],
                 image_grid_thw=batch["image_grid_thw"], gather_logits=True)


def _per_token_loss(model, batch):
    mask = attention_mask_for(batch, True, "sdpa")
    return model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if n.endswith(("lora_a", "lora_b"))}


def test_fresh_adapters_change_nothing(megatron_world):
    config = _config()
    with_lora = _model(config)
    without = _model(_config("model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"))
    lora = _lora_params(with_lora)
    # Attention (QKV, proj) in every layer, the dense MLP, and fc1/fc2 of every expert.
    assert any("self_attention.linear_qkv.lora_b" in n for n in lora)
    assert any("experts.local_experts.3.linear_fc2.lora_b" in n for n in lora)
    assert not _lora_params(without)
    batch = _batch(config)
    with torch.no_grad():
        assert torch.equal(_logits(with_lora, batch), _logits(without, batch))


def test_gradients_reach_adapters_only_from_vision_tokens(megatron_world):
    config = _config()
    model = _model(config)
    lora = _lora_params(model)

    image_batch = _batch(config)
    (_per_token_loss(model, image_batch) * image_batch["loss_mask"]).sum().backward()
    b_grads = {n: p.grad for n, p in lora.items() if n.endswith("lora_b")}
    assert all(g is not None for g in b_grads.values())
    assert any(g.abs().sum() > 0 for n, g in b_grads.items() if "experts" in n)
    assert any(g.abs().sum() > 0 for n, g in b_grads.items() if "linear_qkv" in n)

    model.zero_grad()
    text_batch = _batch(config, max_images=0)
    (_per_token_loss(model, text_batch) * text_batch["loss_mask"]).sum().backward()
    for name, p in lora.items():
        assert p.grad is None or p.grad.abs().sum() == 0, f"{name} got a gradient from text tokens"


@pytest.mark.parametrize("layer,target", [
    (0, "mlp.linear_fc1.lora_b"),                         # the dense first layer
    (1, "mlp.experts.local_experts.{e}.linear_fc1.lora_b"),  # MoE: flags travel with dispatched tokens
])
def test_an_adapter_changes_only_vision_positions(megatron_world, layer, target):
    config = _config()
    model = _model(config)
    batch = _batch(config)
    outputs = []
    handle = model.language_model.decoder.layers[layer].register_forward_hook(
        lambda module, args, output: outputs.append(output[0].detach().clone())
    )
    with torch.no_grad():
        _logits(model, batch)
        for e in range(4):
            getattr_path = target.format(e=e).split(".")
            module = model.language_model.decoder.layers[layer]
            for part in getattr_path[:-1]:
                module = getattr(module, part)
            getattr(module, getattr_path[-1]).normal_()
        _logits(model, batch)
    handle.remove()
    changed = (outputs[0] - outputs[1]).abs().amax(-1).transpose(0, 1)  # [b, s]
    vision = batch["tokens"] == config.model.lm.image_token_id
    assert changed[vision].min() > 0
    assert changed[~vision].max() == 0


def test_disabled_adapters_stay_in_the_model_but_do_nothing(megatron_world):
    enabled, disabled = _config(), _config("model.lm.vision_lora.enabled=false")
    model_on, model_off = _model(enabled), _model(disabled)
    assert set(_lora_params(model_on)) == set(_lora_params(model_off))  # same checkpoint layout
    assert not any(p.requires_grad for p in _lora_params(model_off).values())
    baseline = _model(_config("model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"))
    with torch.no_grad():
        for p in _lora_params(model_off).values():
            p.normal_()
        batch = _batch(enabled)
        assert torch.equal(_logits(model_off, batch), _logits(baseline, batch))
