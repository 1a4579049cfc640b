"""Transformer Engine layers against megatron-core's local layers, built on the CPU (``make test-te``).

TE's modules refuse to be built without CUDA (one ``torch.cuda.is_available()`` check), but
otherwise construct on the CPU and give their real state dicts. So with that one check answered
True while the model is built (nothing here runs a forward), the TE-spec model's sharded state
dict can be compared with the local-spec one, and checkpoints moved between them through
megavl's own save and load. Runs only where Transformer Engine's PyTorch extension imports (see
the Makefile's test-te target); skipped elsewhere.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import TINY_CONFIG

te = pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed (make test-te)")

NO_LORA = ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"]
VARIANTS = {
    "dense": [],
    "moe": ["model.lm.moe.num_experts=4", "model.lm.moe.top_k=2"],
    "qk-norm-moe": ["model.lm.qk_layernorm=true", "model.lm.moe.num_experts=4", "model.lm.moe.top_k=2",
                    "model.lm.moe.shared_expert_ffn_hidden_size=96"],
}


@contextlib.contextmanager
def te_builds_on_the_cpu():
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_available = real


def _models(megatron_world, overrides):
    from megavl.config import load_config
    from megavl.models.vlm import VisionLanguageModel
    from megavl.platform.features import detect

    platform = detect()
    local = VisionLanguageModel(load_config(str(TINY_CONFIG), [*NO_LORA, *overrides, "model.layer_backend=local"]),
                                True, True, platform=platform)
    with te_builds_on_the_cpu():
        te_model = VisionLanguageModel(load_config(str(TINY_CONFIG), [*NO_LORA, *overrides, "model.layer_backend=te"]),
                                       True, True, platform=platform)
    assert any(type(m).__module__.startswith("transformer_engine") for m in te_model.modules())
    return local, te_model


def _checkpoint_keys(model) -> dict:
    """Checkpoint key -> (kind, global shape) of everything the model's sharded state dict saves."""
    keys = {}
    for item in model.sharded_state_dict().values():
        keys[item.key] = (type(item).__name__, tuple(getattr(item, "global_shape", None) or ()))
    return keys


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_te_and_local_layers_save_the_same_tensors(megatron_world, variant):
    """Every tensor has the same checkpoint key and global shape in both; TE adds only the extra state
    (FP8 metadata) of its norms, which megavl's norms do not have."""
    local, te_model = _models(megatron_world, VARIANTS[variant])
    ours, theirs = _checkpoint_keys(local), _checkpoint_keys(te_model)
    assert set(ours) - set(theirs) == set()
    extra = set(theirs) - set(ours)
    assert extra and all(key.endswith("layernorm._extra_state") for key in extra), sorted(extra)
    assert {k: ours[k] for k in ours} == {k: theirs[k] for k in ours}


@pytest.mark.parametrize("variant", ["dense", "qk-norm-moe"])
def test_checkpoints_move_between_te_and_local_layers(megatron_world, tmp_path, variant):
    from megavl.training.checkpoint import load_model_weights, save_model_weights

    local, te_model = _models(megatron_world, VARIANTS[variant])
    save_model_weights(local, str(tmp_path / "local"))
    with te_builds_on_the_cpu():
        load_model_weights(te_model, str(tmp_path / "local"))
    weights = lambda m: {k: v for k, v in m.state_dict().items()  # noqa: E731
                         if torch.is_tensor(v) and not k.endswith("_extra_state")}
    mine = {k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_"): v for k, v in weights(local).items()}
    assert len(weights(te_model)) == len(weights(local))
    for name, value in weights(te_model).items():
        source = mine.get(name)
        if source is not None:
            assert torch.equal(value, source), name

    with te_builds_on_the_cpu():
        save_model_weights(te_model, str(tmp_path / "te"))
    fresh_local, _ = _models(megatron_world, VARIANTS[variant])
    load_model_weights(fresh_local, str(tmp_path / "te"))
    assert all(torch.equal(a, b) for a, b in zip(weights(fresh_local).values(), weights(local).values()))
