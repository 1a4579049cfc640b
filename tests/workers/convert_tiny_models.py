"""Tiny random Hugging Face Qwen2-VL / Qwen2.5-VL models for the converter tests.

Sizes are chosen so layouts cannot be confused: every hidden size differs from
twice its MLP width, the LM has 4 query heads in 2 key/value groups, and every
weight, bias and norm is random (transformers would start norms at one and
biases at zero, which would hide a mapping that drops them).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

# Special-token ids of megavl's tokenizer layout (image pad 3, vision start/end 4/5).
TOKENS = dict(image_token_id=3, vision_start_token_id=4, vision_end_token_id=5, video_token_id=13)


def _text_config(**extra) -> dict:
    return dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
        rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e6),
        **extra,
    )


def qwen2_5_vl_config(tie: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=_text_config(),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            # 56 px windows = 2x2 merged tokens, so the verification image spans several windows.
            window_size=56, fullatt_block_indexes=[2],
        ),
        tie_word_embeddings=tie,
        **TOKENS,
    )


def qwen2_vl_config(tie: bool = True):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=_text_config(),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=3, num_heads=2),
        tie_word_embeddings=tie,
        **TOKENS,
    )


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 1 and name.endswith("weight"):  # norm scales
            param.copy_(1.0 + 0.1 * noise)
        elif param.dim() == 1:
            param.copy_(0.1 * noise)
        else:
            param.copy_(0.05 * noise)


def save_tiny_model(kind: str, folder: str, tie: bool | None = None, seed: int = 0):
    """Builds, randomises and saves (safetensors) a tiny model; returns it in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    if kind == "qwen2_5_vl":
        config = qwen2_5_vl_config(**({} if tie is None else {"tie": tie}))
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif kind == "qwen2_vl":
        config = qwen2_vl_config(**({} if tie is None else {"tie": tie}))
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(folder)
    return model


def copy_config_only(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith(".json") and not name.endswith(".index.json"):
            shutil.copy(os.path.join(src, name), dst)


def edit_architectures(folder: str, architectures: list[str]) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        data = json.load(f)
    data["architectures"] = architectures
    with open(path, "w") as f:
        json.dump(data, f)


def quiet(message: str) -> None:
    """A log function for the converters that prints nothing."""


def read_all_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (tiny models only)."""
    from safetensors import safe_open

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def megavl_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a megavl checkpoint folder written by the importer."""
    from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
    from megavl.training.checkpoint import load_model_weights

    model = build_single_process_model(load_megavl_config(str(folder)))
    load_model_weights(model, str(folder))
    return {k: v.detach().clone() for k, v in model_tensors(model).items()}


def collapse_document_ids(monkeypatch) -> None:
    """A megavl bug for the verification to catch: the forward builds its attention mask as if a
    packed row were one document (padding keeps its own id)."""
    from megavl.models import inputs

    real = inputs.attention_mask_for

    def collapsed(batch, bidirectional_images, backend):
        return real({**batch, "document_ids": batch["document_ids"].clamp(max=0)}, bidirectional_images, backend)

    monkeypatch.setattr(inputs, "attention_mask_for", collapsed)


def assert_saved_logits_match_hf(saved_file, original, hf_dir, config, tolerance: float) -> None:
    """The logits a worker saved per verification input (one document, packed row) match
    transformers' model run on each document alone, positions included."""
    from megavl.convert.verify import compare, hf_document_outputs, reserved_token_ids, verification_inputs

    saved = torch.load(saved_file, weights_only=True)
    inputs = verification_inputs(config, reserved_token_ids(json.loads((hf_dir / "config.json").read_text())))
    assert sorted(saved) == sorted(each.name for each in inputs)
    for each in inputs:
        reference, positions = hf_document_outputs(original, each, config)
        row_positions = each.batch(config)["position_ids"]
        check = compare(each, saved[each.name], reference, tolerance, row_positions, positions)
        assert check.ok, check.describe()
