"""megavl-only features (bidirectional image attention, vision-only LoRA) export to
megavl's remote-code class: transformers loads it with trust_remote_code=True and
it reproduces megavl's logits; the round trip back to megavl is bit-identical."""

from __future__ import annotations

import json

import pytest
import torch

from workers.convert_tiny_models import quiet, save_tiny_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def imported(megatron_world, tmp_path_factory):
    from megavl.convert import import_from_hf

    root = tmp_path_factory.mktemp("remote")
    save_tiny_model("qwen2_5_vl", str(root / "hf"))
    import_from_hf(str(root / "hf"), str(root / "ckpt"), verify=False, log=quiet)
    return root


def with_megavl_features(ckpt, out, image_attention="bidirectional", mlp_rank=4, attn_rank=2, enabled=True):
    """The imported model with megavl's features switched on and random (non-zero) adapters."""
    from megavl.config import dump_config
    from megavl.convert.megavl_model import CONFIG_FILE, build_single_process_model, load_megavl_config
    from megavl.training.checkpoint import load_model_weights, save_model_weights

    config = load_megavl_config(str(ckpt))
    config.model.lm.image_attention = image_attention
    lora = config.model.lm.vision_lora
    lora.mlp_rank, lora.attn_rank, lora.alpha, lora.enabled = mlp_rank, attn_rank, 8.0, enabled
    model = build_single_process_model(config)
    load_model_weights(model, str(ckpt), allow_fresh_adapters=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    save_model_weights(model, str(out))
    (out / CONFIG_FILE).write_text(dump_config(config))
    return config


def megavl_tensors(ckpt) -> dict[str, torch.Tensor]:
    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
    from megavl.training.checkpoint import load_model_weights

    model = build_single_process_model(load_megavl_config(str(ckpt)))
    load_model_weights(model, str(ckpt))
    return {k: v.clone() for k, v in model_tensors(model).items()}


@pytest.mark.parametrize("image_attention, mlp_rank, attn_rank", [
    ("bidirectional", 4, 2),   # both features
    ("causal", 4, 0),          # adapters on the MLPs only
    ("bidirectional", 0, 0),   # the mask alone
])
def test_export_loads_with_remote_code_and_matches_megavl(imported, tmp_path, image_attention, mlp_rank, attn_rank):
    from megavl.convert import export_to_hf, import_from_hf

    ckpt = tmp_path / "features"
    with_megavl_features(imported / "ckpt", ckpt, image_attention, mlp_rank, attn_rank)
    out = tmp_path / "hf_out"
    export = export_to_hf(str(ckpt), str(out), verify=True, log=quiet)
    assert export.architecture == "MegavlQwen2_5_VLForConditionalGeneration"
    assert export.verification.ok, export.verification.describe()
    assert export.verification.max_abs_diff <= TOLERANCE
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["image_attention"] == image_attention
    assert hf_config["vision_lora"] == {"mlp_rank": mlp_rank, "attn_rank": attn_rank, "alpha": 8.0}
    for name in ("modeling_megavl.py", "configuration_megavl.py", "processing_megavl.py"):
        assert (out / name).is_file()

    # megavl -> Hugging Face -> megavl: every tensor unchanged, the features restored.
    again = tmp_path / "again"
    result = import_from_hf(str(out), str(again), verify=True, log=quiet)
    assert result.verification.ok, result.verification.describe()
    assert result.config.model.lm.image_attention == image_attention
    assert (result.config.model.lm.vision_lora.mlp_rank, result.config.model.lm.vision_lora.attn_rank) == (
        mlp_rank, attn_rank)
    before, after = megavl_tensors(ckpt), megavl_tensors(again)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]


def test_packed_check_fails_when_images_see_the_images_of_other_documents(imported, tmp_path, monkeypatch):
    """Bidirectional image attention that ignored document boundaries: the packed row's first and
    last documents both hold images, so their image tokens would see each other."""
    from megavl.attention.mask import TEXT_IMAGE_ID
    from megavl.convert import export_to_hf
    from megavl.models import inputs

    real = inputs.vlm_mask_mod

    def images_across_documents(document_ids, image_ids, turn_ids, bidirectional_images=True):
        allowed = real(document_ids, image_ids, turn_ids, bidirectional_images)

        def mask_mod(b, h, q_idx, kv_idx):
            both_vision = (image_ids[b, q_idx] != TEXT_IMAGE_ID) & (image_ids[b, kv_idx] != TEXT_IMAGE_ID)
            return allowed(b, h, q_idx, kv_idx) | both_vision

        return mask_mod

    with_megavl_features(imported / "ckpt", tmp_path / "features", mlp_rank=0, attn_rank=0)
    monkeypatch.setattr(inputs, "vlm_mask_mod", images_across_documents)
    check = export_to_hf(str(tmp_path / "features"), str(tmp_path / "hf_out"), verify=True, log=quiet).verification
    assert not check.ok
    assert check.input("one document").ok, check.describe()
    with_images, text_only, image_first = check.input("packed row").document_max_abs_diffs
    assert text_only <= TOLERANCE, check.describe()
    assert with_images > TOLERANCE and image_first > TOLERANCE, check.describe()


def exported_model(imported, tmp_path):
    """(config, verification batch, the remote-code model) of an export with both features."""
    from transformers import AutoModelForImageTextToText

    from megavl.convert import export_to_hf
    from megavl.convert.verify import reserved_token_ids, verification_batch

    config = with_megavl_features(imported / "ckpt", tmp_path / "features")
    export_to_hf(str(tmp_path / "features"), str(tmp_path / "hf_out"), verify=False, log=quiet)
    hf_config = json.loads((tmp_path / "hf_out" / "config.json").read_text())
    batch = verification_batch(config, reserved_token_ids(hf_config))
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf_out"), trust_remote_code=True,
                                                        dtype=torch.float32)
    return config, batch, model


def test_the_features_change_the_logits(imported, tmp_path):
    """A remote-code export that ignored the mask or the adapters could not pass verification."""
    from megavl.convert.verify import hf_logits_and_positions

    config, batch, model = exported_model(imported, tmp_path)
    full, _ = hf_logits_and_positions(model, batch, config.model.lm.image_token_id)
    model.config.image_attention = "causal"
    causal, _ = hf_logits_and_positions(model, batch, config.model.lm.image_token_id)
    model.config.image_attention = "bidirectional"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_b"):
                param.zero_()
    no_lora, _ = hf_logits_and_positions(model, batch, config.model.lm.image_token_id)
    assert (full - causal).abs().max() > 1e-3
    assert (full - no_lora).abs().max() > 1e-3


def test_generate_runs_after_a_bidirectional_prompt(imported, tmp_path):
    config, batch, model = exported_model(imported, tmp_path)
    input_ids = batch["tokens"]
    output = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(input_ids == config.model.lm.image_token_id).int(),
        max_new_tokens=4, do_sample=False,
    )
    assert output.shape == (1, input_ids.shape[1] + 4)


def test_disabled_adapters_with_causal_attention_export_to_the_standard_class(imported, tmp_path):
    from megavl.convert import export_to_hf

    ckpt = tmp_path / "plain"
    with_megavl_features(imported / "ckpt", ckpt, image_attention="causal", enabled=False)
    export = export_to_hf(str(ckpt), str(tmp_path / "hf_out"), verify=True, log=quiet)
    assert export.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert export.verification.ok, export.verification.describe()
    assert not (tmp_path / "hf_out" / "modeling_megavl.py").exists()


def test_import_never_runs_python_code_from_the_folder(imported, tmp_path):
    """A folder naming megavl's class imports (and verifies) with megavl's own packaged code:
    the folder's modeling_megavl.py / configuration_megavl.py are never executed."""
    from megavl.convert import export_to_hf, import_from_hf

    ckpt = tmp_path / "features"
    with_megavl_features(imported / "ckpt", ckpt)
    out = tmp_path / "hf_out"
    export_to_hf(str(ckpt), str(out), verify=False, log=quiet)
    ran = tmp_path / "folder_code_ran"
    for name in ("modeling_megavl.py", "configuration_megavl.py", "processing_megavl.py"):
        path = out / name
        path.write_text(f"open({str(ran)!r}, 'w').close()\nraise RuntimeError('code from the folder ran')\n"
                        + path.read_text())
    result = import_from_hf(str(out), str(tmp_path / "again"), verify=True, log=quiet)
    assert result.verification.ok, result.verification.describe()
    assert result.verification.max_abs_diff <= TOLERANCE
    assert not ran.exists()
