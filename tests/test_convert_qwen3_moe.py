"""A Qwen3-MoE language model paired with a Qwen2.5-VL vision tower <-> megavl: the LM's
logits match Qwen3MoeForCausalLM (EP=1 here, EP=2 under torchrun), the vision tower +
adapter match the Qwen2.5-VL visual module, the LM round trip is bit-identical, and
inputs megavl cannot reproduce are refused with clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_torchrun
from workers.convert_tiny_models import (
    collapse_document_ids, copy_config_only, megavl_tensors, quiet, read_all_tensors, save_tiny_model,
)
from workers.convert_tiny_moe_models import save_tiny_qwen3_moe

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    lm = save_tiny_qwen3_moe(str(root / "qwen3_moe"))
    save_tiny_model("qwen2_5_vl", str(root / "qwen2_5_vl"))
    return root / "qwen3_moe", root / "qwen2_5_vl", lm


@pytest.fixture(scope="module")
def imported(hf, megatron_world, tmp_path_factory):
    from megavl.convert import import_pairing

    out = tmp_path_factory.mktemp("megavl") / "ckpt"
    result = import_pairing(str(hf[0]), str(hf[1]), str(out), verify=True, log=quiet)
    return out, result


def test_import_reproduces_lm_logits_and_vision_embeddings(imported):
    out, result = imported
    check = result.verification
    assert check.text_max_abs_diff <= TOLERANCE, check.describe()
    assert check.vision_max_abs_diff <= TOLERANCE, check.describe()
    lm = result.config.model.lm
    assert (lm.moe.num_experts, lm.moe.top_k, lm.moe.ffn_hidden_size, lm.moe.dense_layers) == (4, 2, 40, [0])
    assert lm.qk_layernorm and not lm.qkv_bias and lm.rope == "1d" and not lm.tie_embeddings
    assert lm.image_attention == "causal"
    assert (lm.vision_lora.mlp_rank, lm.vision_lora.attn_rank) == (0, 0)
    text = (out / "megavl_config.yaml").read_text()
    assert "image_attention: causal" in text and "Qwen3MoeForCausalLM" in text


def test_import_checks_the_lm_on_one_document_and_on_a_packed_row(imported):
    check = imported[1].verification
    assert [c.name for c in check.text] == ["one document", "packed row"]
    packed = check.input("packed row")
    assert len(packed.document_tokens) == 3 and packed.padding > 0
    assert packed.ok and packed.position_mismatches == 0, check.describe()


def test_packed_check_fails_when_packed_documents_see_each_other(imported, tmp_path, monkeypatch):
    from megavl.convert import export_language_model

    collapse_document_ids(monkeypatch)
    check = export_language_model(str(imported[0]), str(tmp_path / "lm"), verify=True, log=quiet).verification
    assert not check.ok
    assert check.input("one document").ok, check.describe()
    first, *later = check.input("packed row").document_max_abs_diffs
    assert first <= TOLERANCE and all(d > TOLERANCE for d in later), check.describe()
    assert "LM, one document OK" in check.describe() and "LM, packed row FAILED" in check.describe()


def test_tied_embeddings_import(hf, megatron_world, tmp_path):
    from megavl.convert import import_pairing

    save_tiny_qwen3_moe(str(tmp_path / "tied"), tie=True)
    result = import_pairing(str(tmp_path / "tied"), str(hf[1]), str(tmp_path / "out"), verify=True, log=quiet)
    assert result.config.model.lm.tie_embeddings
    assert result.verification.ok, result.verification.describe()


def test_lm_round_trip_is_bit_identical_and_loads_in_transformers(hf, imported, tmp_path):
    from transformers import AutoModelForCausalLM

    from megavl.convert import export_language_model, import_pairing

    lm_dir, vision_dir, original = hf
    ckpt, _ = imported
    exported = tmp_path / "hf_lm"
    export = export_language_model(str(ckpt), str(exported), max_shard_size="100KB", verify=True, log=quiet)
    assert len(export.shards) > 1
    assert export.verification.ok, export.verification.describe()

    # Hugging Face -> megavl -> Hugging Face: every LM tensor and name unchanged.
    before, after = read_all_tensors(lm_dir), read_all_tensors(exported)
    assert sorted(before) == sorted(after)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []

    # megavl -> Hugging Face -> megavl.
    again = tmp_path / "ckpt_again"
    import_pairing(str(exported), str(vision_dir), str(again), verify=False, log=quiet)
    first, second = megavl_tensors(ckpt), megavl_tensors(again)
    assert sorted(first) == sorted(second)
    assert [k for k in first if not torch.equal(first[k], second[k])] == []

    loaded, info = AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[7, 30, 200, 11, 90, 401]])
    assert torch.equal(original(input_ids=ids).logits, loaded.float()(input_ids=ids).logits)


def _rewrite_lm(src, dst, edit_tensors=None, edit_config=None) -> None:
    copy_config_only(src, dst)
    tensors = read_all_tensors(src)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        path = os.path.join(dst, "config.json")
        with open(path) as f:
            data = json.load(f)
        edit_config(data)
        with open(path, "w") as f:
            json.dump(data, f)


def test_missing_expert_tensor_is_listed_by_name(hf, megatron_world, tmp_path):
    from megavl.convert import TensorMismatchError
    from megavl.convert import import_pairing

    def edit(tensors):
        del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]

    _rewrite_lm(hf[0], tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(TensorMismatchError) as error:
        import_pairing(str(tmp_path / "bad"), str(hf[1]), str(tmp_path / "out"), verify=False, log=quiet)
    assert error.value.missing == ["model.layers.2.mlp.experts.3.up_proj.weight"]
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in str(error.value)


@pytest.mark.parametrize("field, value, message", [
    ("attention_bias", True, r"attention_bias = true"),
    ("hidden_size", 48, r"out_hidden_size = 64 .* must equal the Qwen3-MoE hidden_size = 48"),
])
def test_configs_megavl_cannot_reproduce_are_refused(hf, tmp_path, field, value, message):
    from megavl.convert import ConversionError
    from megavl.convert import import_pairing

    def edit(data):
        data[field] = value

    _rewrite_lm(hf[0], tmp_path / "bad", edit_config=edit)
    with pytest.raises(ConversionError, match=message):
        import_pairing(str(tmp_path / "bad"), str(hf[1]), str(tmp_path / "out"), verify=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_unnormalised_top_k_imports_with_verified_logits_and_exports_back(hf, megatron_world, tmp_path):
    """norm_topk_prob = false maps to model.lm.moe.normalize_top_k = false (megatron's
    pre-softmax routing); the logits differ from the normalised model's, so matching them
    proves the routing."""
    from transformers import Qwen3MoeForCausalLM

    from megavl.convert import export_language_model, import_pairing

    def edit(data):
        data["norm_topk_prob"] = False

    _rewrite_lm(hf[0], tmp_path / "unnormalised", edit_config=edit)
    original = hf[2]
    unnormalised = Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "unnormalised"), dtype=torch.float32).eval()
    ids = torch.tensor([[7, 30, 200, 11]])
    assert not torch.allclose(original(input_ids=ids).logits, unnormalised(input_ids=ids).logits, atol=1e-4)

    result = import_pairing(str(tmp_path / "unnormalised"), str(hf[1]), str(tmp_path / "ckpt"), verify=True, log=quiet)
    assert result.config.model.lm.moe.normalize_top_k is False
    assert result.verification.ok, result.verification.describe()
    export_language_model(str(tmp_path / "ckpt"), str(tmp_path / "lm"), verify=True, log=quiet)
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["norm_topk_prob"] is False


def test_cli_needs_vision_from_for_a_language_model(hf, tmp_path, capsys):
    from tools.convert_from_hf import main

    assert main(["--hf", str(hf[0]), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Qwen3MoeForCausalLM is a language model without a vision tower" in err and "--vision-from" in err


def test_cli_imports_the_pair_and_exports_the_lm(hf, megatron_world, tmp_path):
    from tools.convert_from_hf import main as import_main
    from tools.convert_to_hf import main as export_main

    ckpt = tmp_path / "ckpt"
    assert import_main(["--hf", str(hf[0]), "--vision-from", str(hf[1]), "--out", str(ckpt), "--no-verify"]) == 0
    assert (ckpt / "hf_vision_config.json").is_file()
    export_args = ["--load", str(ckpt), "--out", str(tmp_path / "lm"), "--language-model-only", "--no-verify"]
    assert export_main(export_args) == 0
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]


def test_whole_model_export_refuses_the_moe_lm(imported, tmp_path):
    from megavl.convert import UnsupportedModelError, export_to_hf

    with pytest.raises(UnsupportedModelError, match=r"moe.num_experts = 4"):
        export_to_hf(str(imported[0]), str(tmp_path / "out"), log=quiet)


@pytest.mark.slow
def test_ep2_checkpoint_reproduces_hf_logits(hf, imported, tmp_path):
    from megavl.convert.verify import compare, reserved_token_ids
    from megavl.convert.verify_pairing import hf_text_logits, text_inputs

    ckpt, result = imported
    run_torchrun(2, "convert_moe_logits.py", [
        "--load", str(ckpt), "--set", "parallel.expert=2", "--out", str(tmp_path / "ep2.pt"),
    ])
    ep2 = torch.load(tmp_path / "ep2.pt", weights_only=True)
    reserved = set()
    for name in ("hf_config.json", "hf_vision_config.json"):
        reserved |= reserved_token_ids(json.loads((ckpt / name).read_text()))
    inputs = text_inputs(result.config, reserved)
    assert sorted(ep2) == sorted(each.name for each in inputs)
    for each in inputs:
        reference = [hf_text_logits(hf[2], batch) for batch in each.document_batches(result.config)]
        check = compare(each, ep2[each.name], reference, TOLERANCE)
        assert check.ok, check.describe()
