"""Qwen2.5-VL <-> megavl: logits match transformers at TP=1 and TP=2, round trips are
bit-identical, the export loads with from_pretrained, and bad inputs give clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from conftest import run_torchrun
from workers.convert_tiny_models import (
    assert_saved_logits_match_hf,
    TOKENS, collapse_document_ids, copy_config_only, edit_architectures, megavl_tensors, quiet, read_all_tensors,
    save_tiny_model,
)

KIND = "qwen2_5_vl"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / KIND
    model = save_tiny_model(KIND, str(folder))
    return folder, model


@pytest.fixture(scope="module")
def imported(hf, megatron_world, tmp_path_factory):
    from megavl.convert import import_from_hf

    out = tmp_path_factory.mktemp("megavl") / "ckpt"
    result = import_from_hf(str(hf[0]), str(out), verify=True, log=quiet)
    return out, result


def test_import_reproduces_hf_logits_and_positions(imported):
    out, result = imported
    check = result.verification
    assert check.position_mismatches == 0, check.describe()
    assert check.max_abs_diff <= TOLERANCE, check.describe()
    # Both inputs were checked: one document, and a packed row of several documents with
    # images of different sizes spread over them and trailing padding.
    assert [c.name for c in check.inputs] == ["one document", "packed row"]
    packed = check.input("packed row")
    assert len(packed.document_tokens) == 3 and packed.padding > 0
    assert len({tuple(grid) for grid in packed.image_grids}) == 3
    assert len(packed.document_max_abs_diffs) == 3 and packed.ok
    assert "one document OK" in check.describe() and "packed row OK" in check.describe()
    assert result.config.model.lm.image_attention == "causal"
    assert result.config.model.vision.full_attention_layers == [2]
    assert "image_attention: causal" in (out / "megavl_config.yaml").read_text()


@pytest.mark.parametrize("layout", [
    ["text", (4, 6), "text"],                 # text after a wide image
    [(6, 4), "text", (2, 2), "text"],          # image first, a tall one, then a small one
    ["text", (4, 8)],                          # image last
])
def test_mrope_positions_agree_with_get_rope_index(hf, layout):
    from megavl.data.batch import ImagePatches, Sample, mrope_position_ids

    _, model = hf
    image_token = TOKENS["image_token_id"]
    tokens, images = [], []
    for part in layout:
        if part == "text":
            tokens += [20, 21, 22]
        else:
            h, w = part
            images.append(ImagePatches(torch.zeros(h * w, 1), (1, h, w)))
            tokens += [image_token] * (h * w // 4)
    sample = Sample(tokens=tokens, labels=[-100] * len(tokens), turn_ids=[0] * len(tokens), images=images)
    ours = mrope_position_ids(sample, image_token, merge=2)
    ids = torch.tensor([tokens])
    theirs, _ = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == image_token).int(),
        image_grid_thw=torch.tensor([list(im.grid_thw) for im in images]),
    )
    assert torch.equal(ours, theirs[:, 0])


def test_round_trips_are_bit_identical_and_export_loads_in_transformers(hf, imported, tmp_path):
    from transformers import AutoModelForImageTextToText

    from megavl.convert import export_to_hf, import_from_hf
    from megavl.convert.verify import hf_logits_and_positions, reserved_token_ids, verification_batch

    hf_dir, original = hf
    ckpt, result = imported
    exported = tmp_path / "hf_out"
    # Small shards, so the export is sharded and the re-import reads an index.
    export = export_to_hf(str(ckpt), str(exported), max_shard_size="150KB", verify=True, log=quiet)
    assert len(export.shards) > 1
    assert export.verification.ok, export.verification.describe()
    assert (exported / "model.safetensors.index.json").is_file()

    # Hugging Face -> megavl -> Hugging Face: every tensor and name unchanged.
    before, after = read_all_tensors(hf_dir), read_all_tensors(exported)
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]

    # megavl -> Hugging Face -> megavl.
    again = tmp_path / "ckpt_again"
    import_from_hf(str(exported), str(again), verify=False, log=quiet)
    first, second = megavl_tensors(ckpt), megavl_tensors(again)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)

    loaded, info = AutoModelForImageTextToText.from_pretrained(str(exported), output_loading_info=True)
    assert type(loaded).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = verification_batch(result.config, reserved_token_ids(json.loads((hf_dir / "config.json").read_text())))
    theirs, _ = hf_logits_and_positions(original, batch, TOKENS["image_token_id"])
    ours, _ = hf_logits_and_positions(loaded.float(), batch, TOKENS["image_token_id"])
    assert torch.equal(theirs, ours)


def test_packed_check_fails_when_packed_documents_see_each_other(imported, tmp_path, monkeypatch):
    from megavl.convert import export_to_hf

    ckpt, _ = imported
    collapse_document_ids(monkeypatch)
    export = export_to_hf(str(ckpt), str(tmp_path / "hf_out"), verify=True, log=quiet)
    check = export.verification
    assert not check.ok
    single, packed = check.input("one document"), check.input("packed row")
    assert single.ok, check.describe()
    assert not packed.ok and packed.position_mismatches == 0
    # The first document has nothing before it to see; the later ones see their predecessors.
    first, *later = packed.document_max_abs_diffs
    assert first <= TOLERANCE and all(d > TOLERANCE for d in later), check.describe()
    assert "one document OK" in check.describe() and "packed row FAILED" in check.describe()


def test_packed_check_fails_when_positions_run_on_across_documents(imported, tmp_path, monkeypatch, capsys):
    """RoPE is relative, so isolated documents whose positions continue along the row keep their
    logits; the per-document comparison with get_rope_index still refuses the row, and the tool exits 1."""
    import megavl.convert.verify as verify
    from tools.convert_to_hf import main

    real = verify.pack_row

    def numbered_along_the_row(samples, seq_length, *args, **kwargs):
        row = real(samples, seq_length, *args, **kwargs)
        start = 0
        for sample in samples:
            row["position_ids"][:, start:start + len(sample)] += start
            start += len(sample)
        return row

    monkeypatch.setattr(verify, "pack_row", numbered_along_the_row)
    assert main(["--load", str(imported[0]), "--out", str(tmp_path / "hf_out")]) == 1
    err = capsys.readouterr().err
    assert re.search(r"one document OK: .*mrope positions match get_rope_index$", err, re.MULTILINE), err
    packed = re.search(r"packed row FAILED: .*max \|logit diff\| = (\S+) .*"
                       r"mrope positions differ from get_rope_index per document at [1-9]\d* entries$",
                       err, re.MULTILINE)
    assert packed and float(packed.group(1)) <= TOLERANCE, err


def test_export_reads_a_training_checkpoint_and_its_stored_config(imported, tmp_path):
    from megavl.convert import export_to_hf
    from megavl.convert.megavl_model import load_megavl_config
    from megavl.models.build import build_model
    from megavl.training.checkpoint import TrainState, load_model_weights, save_checkpoint

    ckpt, _ = imported
    config = load_megavl_config(str(ckpt))
    model = build_model(config)
    load_model_weights(model, str(ckpt))
    root = tmp_path / "run"
    # A run's checkpoint: iter_* folder, `latest`, the config stored inside.
    save_checkpoint(str(root), config, model, None, None, TrainState(step=3), None)
    assert not (root / "megavl_config.yaml").exists()  # the config comes from the checkpoint itself
    export = export_to_hf(str(root), str(tmp_path / "hf_out"), verify=True, log=quiet)
    assert export.verification.ok, export.verification.describe()


def test_export_writes_tokenizer_and_a_matching_image_processor(imported, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from megavl.data.images import image_to_model_input
    from megavl.data.tokenizer import train_tokenizer

    sys_argv = ["--load", str(imported[0]), "--out", str(tmp_path / "hf_out"),
                "--tokenizer", str(tmp_path / "tok"), "--no-verify"]
    train_tokenizer(["a picture of a cat", "two dogs and 3 birds"] * 20, 300, str(tmp_path / "tok"))
    from tools.convert_to_hf import main

    assert main(sys_argv) == 0
    out = tmp_path / "hf_out"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == TOKENS["image_token_id"]
    config = json.loads((out / "config.json").read_text())
    assert config["vision_start_token_id"] == 4 and config["vision_end_token_id"] == 5

    processor = AutoImageProcessor.from_pretrained(str(out))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    ours = image_to_model_input(image, imported[1].config)
    theirs = processor(images=[image], return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [list(ours.grid_thw)]
    torch.testing.assert_close(theirs["pixel_values"], ours.pixel_values, atol=1e-5, rtol=0)


def _rewrite_checkpoint(src, dst, edit) -> None:
    copy_config_only(src, dst)
    tensors = read_all_tensors(src)
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_listed_by_name(hf, megatron_world, tmp_path):
    from megavl.convert import TensorMismatchError, import_from_hf

    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        del tensors["visual.blocks.0.attn.qkv.bias"]
        tensors["visual.blocks.9.attn.extra.weight"] = torch.zeros(2)

    _rewrite_checkpoint(hf[0], tmp_path / "bad", edit)
    with pytest.raises(TensorMismatchError) as error:
        import_from_hf(str(tmp_path / "bad"), str(tmp_path / "out"), verify=False, log=quiet)
    assert error.value.missing == ["model.layers.1.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.bias"]
    assert error.value.unexpected == ["visual.blocks.9.attn.extra.weight"]
    message = str(error.value)
    assert "model.layers.1.mlp.up_proj.weight" in message and "visual.blocks.9.attn.extra.weight" in message


def test_wrong_shape_names_tensor_expected_and_actual(hf, megatron_world, tmp_path):
    from megavl.convert import TensorMismatchError, import_from_hf

    def edit(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(31, 64)

    _rewrite_checkpoint(hf[0], tmp_path / "bad", edit)
    with pytest.raises(TensorMismatchError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: expected \[32, 64\], got \[31, 64\]"):
        import_from_hf(str(tmp_path / "bad"), str(tmp_path / "out"), verify=False, log=quiet)


def test_wrong_architecture_names_found_and_supported(hf, tmp_path, capsys):
    from tools.convert_from_hf import main

    folder = tmp_path / "llama"
    shutil.copytree(hf[0], folder)
    edit_architectures(folder, ["LlamaForCausalLM"])
    assert main(["--hf", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err
    assert "Qwen2_5_VLForConditionalGeneration" in err and "Qwen2VLForConditionalGeneration" in err


def test_a_layout_the_model_cannot_be_split_into_is_refused(hf, tmp_path):
    from megavl.convert import ConversionError, import_from_hf

    with pytest.raises(ConversionError, match=r"(?s)--tensor 4.*num_query_groups = 2: must be divisible by parallel.tensor \(4\)"):
        import_from_hf(str(hf[0]), str(tmp_path / "out"), tensor=4, verify=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_the_standard_class_refuses_bidirectional_image_attention(imported, tmp_path):
    """Such a model exports to megavl's remote-code class (tests/test_convert_remote_code.py), not this one."""
    from megavl.convert import UnsupportedModelError, export_to_hf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(imported[0], ckpt)
    yaml_path = ckpt / "megavl_config.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("image_attention: causal", "image_attention: bidirectional"))
    with pytest.raises(UnsupportedModelError, match=r"image_attention = bidirectional: .*attends causally.*remote-code"):
        export_to_hf(str(ckpt), str(tmp_path / "out"), architecture="Qwen2_5_VLForConditionalGeneration", log=quiet)
    assert not (tmp_path / "out").exists()


def _checkpoint_with_vision_lora(imported, folder, enabled: bool):
    """The imported model plus megavl's vision-only LoRA adapters (random, non-zero B)."""
    from megavl.config import dump_config
    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
    from megavl.training.checkpoint import load_model_weights, save_model_weights

    base_dir, _ = imported
    base = build_single_process_model(load_megavl_config(str(base_dir)))
    load_model_weights(base, str(base_dir))
    config = load_megavl_config(str(base_dir))
    lora = config.model.lm.vision_lora
    lora.mlp_rank, lora.attn_rank, lora.enabled = 4, 2, enabled
    model = build_single_process_model(config)
    with torch.no_grad():
        base_tensors = model_tensors(base)
        for name, tensor in model_tensors(model).items():
            tensor.copy_(base_tensors[name] if name in base_tensors else torch.randn(tensor.shape))
    save_model_weights(model, str(folder))
    (folder / "megavl_config.yaml").write_text(dump_config(config))


def test_export_leaves_out_disabled_vision_lora_and_the_standard_class_refuses_active_one(imported, tmp_path):
    from megavl.convert import UnsupportedModelError, export_to_hf

    _checkpoint_with_vision_lora(imported, tmp_path / "disabled", enabled=False)
    export = export_to_hf(str(tmp_path / "disabled"), str(tmp_path / "hf_out"), verify=True, log=quiet)
    assert export.verification.ok, export.verification.describe()
    assert not any("lora" in name for name in read_all_tensors(tmp_path / "hf_out"))

    _checkpoint_with_vision_lora(imported, tmp_path / "active", enabled=True)
    with pytest.raises(UnsupportedModelError, match=r"vision_lora: mlp_rank = 4, attn_rank = 2.*remote-code"):
        export_to_hf(str(tmp_path / "active"), str(tmp_path / "hf_active"),
                     architecture="Qwen2_5_VLForConditionalGeneration", log=quiet)


@pytest.mark.slow
def test_tp2_checkpoint_reproduces_hf_logits(hf, imported, tmp_path):
    hf_dir, original = hf
    ckpt, result = imported
    run_torchrun(2, "convert_logits.py", [
        "--load", str(ckpt), "--hf", str(hf_dir), "--set", "parallel.tensor=2", "--out", str(tmp_path / "tp2.pt"),
    ])
    assert_saved_logits_match_hf(tmp_path / "tp2.pt", original, hf_dir, result.config, TOLERANCE)
