"""Qwen2-VL <-> megavl (LayerNorm + QuickGELU vision tower, no windows, tied embeddings):
logits match transformers at TP=1 and TP=2, round trips are bit-identical, errors are clear."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_torchrun
from workers.convert_tiny_models import (
    assert_saved_logits_match_hf,
    copy_config_only, quiet, read_all_tensors, save_tiny_model,
)

KIND = "qwen2_vl"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / KIND
    model = save_tiny_model(KIND, str(folder), tie=True)
    # The image-size limits travel through the image processor's settings.
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 3136, "longest_edge": 100352}, "patch_size": 14,
         "temporal_patch_size": 2, "merge_size": 2}
    ))
    return folder, model


@pytest.fixture(scope="module")
def imported(hf, megatron_world, tmp_path_factory):
    from megavl.convert import import_from_hf

    out = tmp_path_factory.mktemp("megavl") / "ckpt"
    result = import_from_hf(str(hf[0]), str(out), tensor=2, verify=True, log=quiet)
    return out, result


def test_import_builds_the_qwen2_vl_vision_tower_and_reproduces_logits(imported):
    _, result = imported
    check = result.verification
    assert check.position_mismatches == 0, check.describe()
    assert check.max_abs_diff <= TOLERANCE, check.describe()
    config = result.config
    v = config.model.vision
    assert (v.norm, v.mlp, v.ffn_hidden_size) == ("layernorm", "gelu_quick", 96)
    assert v.full_attention_layers == [0, 1]
    assert config.model.lm.tie_embeddings
    assert config.parallel.tensor == 2  # the intended layout is recorded
    assert (config.data.resolution.min_pixels, config.data.resolution.max_pixels) == (3136, 100352)


def test_checkpoint_stores_norms_under_transformer_engine_names(imported):
    from megatron.core import dist_checkpointing

    keys = set(dist_checkpointing.load_tensors_metadata(str(imported[0])))
    # What a GPU run with Transformer Engine's fused LayerNorm+linear expects to load.
    assert "vision.layers.0.self_attention.linear_qkv.layer_norm_bias" in keys
    assert "vision.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "adapter.norm.bias" in keys
    assert not any("input_layernorm" in k for k in keys)


def test_round_trips_are_bit_identical_with_tied_embeddings(hf, imported, tmp_path):
    from transformers import AutoModelForImageTextToText

    from megavl.convert import export_to_hf, import_from_hf
    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
    from megavl.training.checkpoint import load_model_weights

    hf_dir, _ = hf
    ckpt, _ = imported
    exported = tmp_path / "hf_out"
    export = export_to_hf(str(ckpt), str(exported), verify=True, log=quiet)
    assert export.architecture == "Qwen2VLForConditionalGeneration"
    assert export.verification.ok, export.verification.describe()
    before, after = read_all_tensors(hf_dir), read_all_tensors(exported)
    assert "lm_head.weight" not in after  # tied: the embedding serves as the head
    assert sorted(k for k in before if k != "lm_head.weight") == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in after)
    assert json.loads((exported / "config.json").read_text())["tie_word_embeddings"] is True

    loaded, info = AutoModelForImageTextToText.from_pretrained(str(exported), output_loading_info=True)
    assert type(loaded).__name__ == "Qwen2VLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.lm_head.weight.data_ptr() == loaded.model.language_model.embed_tokens.weight.data_ptr()

    again = tmp_path / "ckpt_again"
    import_from_hf(str(exported), str(again), verify=False, log=quiet)
    tensors = []
    for folder in (ckpt, again):
        model = build_single_process_model(load_megavl_config(str(folder)))
        load_model_weights(model, str(folder))
        tensors.append({k: v.detach().clone() for k, v in model_tensors(model).items()})
    assert sorted(tensors[0]) == sorted(tensors[1])
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_missing_layernorm_bias_is_listed(hf, megatron_world, tmp_path):
    from megavl.convert import TensorMismatchError, import_from_hf

    bad = tmp_path / "bad"
    copy_config_only(hf[0], bad)
    tensors = read_all_tensors(hf[0])
    del tensors["visual.blocks.1.norm2.bias"], tensors["visual.merger.ln_q.bias"]
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TensorMismatchError) as error:
        import_from_hf(str(bad), str(tmp_path / "out"), verify=False, log=quiet)
    assert error.value.missing == ["visual.blocks.1.norm2.bias", "visual.merger.ln_q.bias"]


def test_export_refuses_window_attention_with_every_architectures_reasons(imported, tmp_path):
    from megavl.convert import UnsupportedModelError, export_to_hf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(imported[0], ckpt)
    yaml_path = ckpt / "megavl_config.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("full_attention_layers: [0, 1]", "full_attention_layers: [1]"))
    with pytest.raises(UnsupportedModelError) as error:
        export_to_hf(str(ckpt), str(tmp_path / "out"), log=quiet)
    message = str(error.value)
    assert "Qwen2-VL has no window attention, but layers [0] would use windows" in message
    assert "Qwen2.5-VL's vision tower uses rmsnorm" in message


@pytest.mark.slow
def test_tp2_checkpoint_reproduces_hf_logits(hf, imported, tmp_path):
    hf_dir, original = hf
    ckpt, result = imported
    # The converted config already records parallel.tensor = 2.
    run_torchrun(2, "convert_logits.py", ["--load", str(ckpt), "--hf", str(hf_dir), "--out", str(tmp_path / "tp2.pt")])
    assert_saved_logits_match_hf(tmp_path / "tp2.pt", original, hf_dir, result.config, TOLERANCE)
