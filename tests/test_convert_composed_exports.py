"""Composed VLMs exported to Hugging Face's classes for them (tools/convert_to_hf.py): CLIP or SigLIP +
mlp + a Qwen2 / Qwen3 LM as LlavaForConditionalGeneration, SigLIP + pixel shuffle + a Llama LM as
Idefics3ForConditionalGeneration, each verified by logits on a document and a packed row; models
either class cannot express are refused with the field named.

Each model is a composed import of tiny random Hugging Face parts (tests/test_convert_composed.py)
whose fresh projector is then filled with random values, so that no bias is zero and swapped
projector tensors cannot agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_tokenizer
from test_convert_composed import CORPUS, plain_tokenizer, save_lm, save_vision
from workers.convert_tiny_models import quiet

TOLERANCE = 1e-4

# (vision kind, --vision-layer, LM kind, tied, adapter, adapter args, tokenizer with megavl's tokens, architecture)
CASES = {
    "clip+mlp+qwen2": ("clip", None, "qwen2", False, "mlp", [], True, "LlavaForConditionalGeneration"),
    # Layer -2 of SigLIP's two: before its final norm, as LLaVA reads towers.
    "siglip+mlp+qwen3": ("siglip", -2, "qwen3", True, "mlp", [], True, "LlavaForConditionalGeneration"),
    "siglip+pixel_shuffle+llama": ("siglip", None, "llama", True, "pixel_shuffle",
                                   ["factor=2", "norm=none", "bias=false"], False, "Idefics3ForConditionalGeneration"),
}
# The Llama LM scales its RoPE as Llama 3.2 does, so the export writes "llama3" rope parameters.
ROPES = {"siglip+pixel_shuffle+llama": dict(rope_type="llama3", rope_theta=10000.0, factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=8192)}


def _with_random_projector(folder) -> None:
    """Rewrites the megavl checkpoint in folder with random projector tensors (biases included)."""
    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
    from megavl.training.checkpoint import load_model_weights, save_model_weights

    model = build_single_process_model(load_megavl_config(str(folder)))
    load_model_weights(model, str(folder))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, tensor in model_tensors(model).items():
            if name.startswith("adapter."):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
    save_model_weights(model, str(folder))


@pytest.fixture(scope="module")
def exported(megatron_world, tmp_path_factory):
    """Each case's composed checkpoint (with a random projector) and its verified export."""
    from megavl.convert import export_to_hf
    from megavl.convert.composed import import_composed

    results = {}
    for name, (vision, layer, lm, tie, adapter, args, has_tokens, _) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        save_vision(vision, str(root / "vision"))
        tokenizer = tiny_tokenizer(CORPUS) if has_tokens else plain_tokenizer()
        save_lm(lm, str(root / "lm"), tokenizer, len(tokenizer), tie, rope=ROPES.get(name))
        import_composed(str(root / "vision"), str(root / "lm"), adapter, str(root / "megavl"), adapter_args=args,
                        vision_layer=layer, verify=False, log=quiet)
        _with_random_projector(root / "megavl")
        result = export_to_hf(str(root / "megavl"), str(root / "hf"), tokenizer=str(root / "megavl" / "tokenizer"),
                              verify=True, log=quiet)
        results[name] = (root, result)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_the_export_reproduces_megavl_logits(exported, case):
    root, result = exported[case]
    assert result.architecture == CASES[case][-1]
    check = result.verification
    assert check.ok, check.describe()
    assert check.max_abs_diff <= TOLERANCE
    assert [c.name for c in check.inputs] == ["one document", "packed row"]
    assert all(c.position_mismatches == 0 for c in check.inputs)
    # Every image of the packed row reached the model: 3 images, in 2 of its 3 documents.
    assert len(check.input("packed row").image_grids) == 3


@pytest.mark.parametrize("case", list(CASES))
def test_the_folder_loads_every_weight_and_describes_the_parts(exported, case):
    import transformers

    root, result = exported[case]
    vision, _, lm_kind, tie, _, _, _, architecture = CASES[case]
    model, info = getattr(transformers, architecture).from_pretrained(
        str(root / "hf"), local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    data = json.loads((root / "hf" / "config.json").read_text())
    assert data["text_config"]["model_type"] == lm_kind
    assert data["text_config"]["head_dim"] == (24 if lm_kind == "qwen3" else 16)
    assert data["tie_word_embeddings"] == tie
    config = result.config
    if architecture.startswith("Llava"):
        assert data["image_token_index"] == config.model.lm.image_token_id
        assert data["vision_config"]["model_type"] == f"{vision}_vision_model"
        assert data["vision_feature_layer"] == -1
        assert data["vision_config"]["num_hidden_layers"] == config.model.vision.num_layers
        assert data["vision_feature_select_strategy"] == ("default" if vision == "clip" else "full")
        processor = json.loads((root / "hf" / "processor_config.json").read_text())
        assert processor["image_token"] == "<|image_pad|>"
        assert processor["num_additional_image_tokens"] == (1 if vision == "clip" else 0)
        _check_llava_processor(root / "hf", config)
    else:
        assert data["scale_factor"] == 2 and data["image_token_id"] == config.model.lm.image_token_id
        rope = data["text_config"]["rope_parameters"]
        assert config.model.lm.rope_scaling_factor == 32.0
        assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("llama3", 32.0, 8192)


def _check_llava_processor(folder, config) -> None:
    """AutoProcessor gives a prompt as many image tokens as megavl's model takes per image."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|> how many"], images=[image],
                    return_tensors="pt")
    v = config.model.vision
    side = v.image_size // v.patch_size
    assert out["input_ids"][0].tolist().count(config.model.lm.image_token_id) == side * side
    assert tuple(out["pixel_values"].shape) == (1, 3, v.image_size, v.image_size)


@pytest.mark.parametrize("case", list(CASES))
def test_the_image_processor_normalises_with_the_towers_statistics(exported, case):
    """An image already of the tower's size reaches the model as megavl normalises it."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from megavl.config.towers import image_normalisation

    root, result = exported[case]
    v = result.config.model.vision
    pixels = np.random.default_rng(2).integers(0, 256, (v.image_size, v.image_size, 3), dtype=np.uint8)
    processor = AutoImageProcessor.from_pretrained(str(root / "hf"), local_files_only=True)
    theirs = processor(images=[Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    mean, std = image_normalisation(v)
    ours = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(theirs.reshape(-1, *ours.shape)[0], ours, atol=1e-5, rtol=0)


def test_swapped_projector_biases_fail_the_verification(exported, tmp_path, monkeypatch):
    """The two projector biases have the same shape: exported the wrong way round, the logits say so."""
    from megavl.convert import export_to_hf
    from megavl.convert.llava import Llava
    from megavl.convert.mapping import Direct, Replicated

    def swapped(self, config):
        p = "multi_modal_projector."
        return [Direct("adapter.linear_fc1.weight", p + "linear_1.weight"),
                Direct("adapter.linear_fc2.weight", p + "linear_2.weight"),
                Direct("adapter.linear_fc1.bias", p + "linear_2.bias"),
                Replicated("adapter.linear_fc2.bias", p + "linear_1.bias")]

    monkeypatch.setattr(Llava, "adapter_mappings", swapped)
    root, _ = exported["clip+mlp+qwen2"]
    result = export_to_hf(str(root / "megavl"), str(tmp_path / "hf"), verify=True, log=quiet)
    assert not result.verification.ok and result.verification.max_abs_diff > 100 * TOLERANCE


def _edited_checkpoint(root, folder, edit):
    """The checkpoint of root with its config edited (the weights are linked, not copied)."""
    import os

    from megavl.config import dump_config
    from megavl.convert.megavl_model import load_megavl_config

    folder.mkdir()
    for name in os.listdir(root / "megavl"):
        if name != "megavl_config.yaml":
            os.symlink(root / "megavl" / name, folder / name)
    config = load_megavl_config(str(root / "megavl"))
    edit(config)
    (folder / "megavl_config.yaml").write_text(dump_config(config))
    return str(folder)


@pytest.mark.parametrize("edit, architecture, message", [
    (lambda c: setattr(c.model.lm, "image_attention", "bidirectional"), "LlavaForConditionalGeneration",
     "model.lm.image_attention = bidirectional: LlavaForConditionalGeneration attends causally"),
    (lambda c: setattr(c.data.resolution, "mode", "native"), "LlavaForConditionalGeneration",
     "data.resolution.mode = native"),
    (lambda c: setattr(c.data.resolution, "fixed_tokens", 16), "LlavaForConditionalGeneration",
     "data.resolution.fixed_tokens = 16 (56 px squares): LlavaForConditionalGeneration's tower takes squares of "
     "3 x 3 patches (42 px)"),
    (lambda c: setattr(c.model.lm, "qk_layernorm", True), "LlavaForConditionalGeneration",
     "no Hugging Face text LM has both"),
    (lambda c: setattr(c.model.vision, "post_norm", True), "LlavaForConditionalGeneration",
     "model.vision.post_norm = true: LLaVA reads the tower's hidden states"),
    (lambda c: None, "Idefics3ForConditionalGeneration",
     "model.vision.kind = clip: Idefics3ForConditionalGeneration's tower is siglip"),
])
def test_what_the_class_cannot_express_is_refused_with_the_field(exported, tmp_path, edit, architecture, message):
    from megavl.convert import UnsupportedModelError, export_to_hf

    root, _ = exported["clip+mlp+qwen2"]
    load = _edited_checkpoint(root, tmp_path / "edited", edit)
    with pytest.raises(UnsupportedModelError) as error:
        export_to_hf(load, str(tmp_path / "hf"), architecture=architecture, verify=False, log=quiet)
    assert message in str(error.value)
    assert not (tmp_path / "hf").exists()


def test_idefics3_refuses_a_connector_with_a_bias_or_a_norm(exported, tmp_path):
    from megavl.convert import UnsupportedModelError, export_to_hf

    root, _ = exported["siglip+pixel_shuffle+llama"]

    def edit(config):
        config.model.adapter.bias, config.model.adapter.norm = True, "after"

    load = _edited_checkpoint(root, tmp_path / "edited", edit)
    with pytest.raises(UnsupportedModelError) as error:
        export_to_hf(load, str(tmp_path / "hf"), architecture="Idefics3ForConditionalGeneration", verify=False,
                     log=quiet)
    assert "model.adapter.bias = true" in str(error.value) and "model.adapter.norm = after" in str(error.value)


def test_a_llava_folder_is_not_imported_but_the_parts_are_named(exported, tmp_path):
    from megavl.convert import import_from_hf
    from megavl.convert.errors import ConversionError

    root, _ = exported["clip+mlp+qwen2"]
    with pytest.raises(ConversionError, match="--vision TOWER --lm LM --adapter KIND"):
        import_from_hf(str(root / "hf"), str(tmp_path / "out"), log=quiet)
