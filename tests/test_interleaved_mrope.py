"""Qwen3-VL's interleaved multimodal RoPE (model.lm.mrope_layout = interleaved) against transformers'
Qwen3VLTextRotaryEmbedding, and the sections layout left as megatron-core computes it."""

from __future__ import annotations

import pytest
import torch

from megavl.config import ConfigError, load_config, validate
from conftest import TINY_CONFIG


def _positions(seq: int) -> torch.Tensor:
    """[3, 2, seq] positions with the three axes apart (an image's grid inside text)."""
    generator = torch.Generator().manual_seed(seq)
    return torch.randint(0, 4096, (3, 2, seq), generator=generator)


@pytest.mark.parametrize("head_dim, section", [(128, [24, 20, 20]), (32, [6, 5, 5]), (64, [11, 11, 10])])
def test_interleaved_angles_match_qwen3_vl(megatron_world, head_dim, section):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from megavl.models.interleaved_mrope import InterleavedMultimodalRotaryEmbedding

    theta = 5_000_000.0
    hf_config = Qwen3VLTextConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                  rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                   "mrope_section": section, "mrope_interleaved": True})
    positions = _positions(40)
    cos, sin = Qwen3VLTextRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    ours = InterleavedMultimodalRotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=theta)
    angles = ours(positions, section)  # [s, b, 1, head_dim]
    assert angles.shape == (40, 2, 1, head_dim)
    angles = angles[:, :, 0].transpose(0, 1)
    torch.testing.assert_close(angles.cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(angles.sin(), sin, rtol=0, atol=1e-6)


def test_the_sections_layout_is_megatrons_and_differs_from_the_interleaved(megatron_world):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    from megavl.models.interleaved_mrope import InterleavedMultimodalRotaryEmbedding, interleaved_axes

    assert interleaved_axes([2, 2, 2], 6) == [0, 1, 2, 0, 1, 2]
    assert interleaved_axes([4, 1, 1], 6) == [0, 1, 2, 0, 0, 0]
    with pytest.raises(ValueError, match="axis 2 needs frequency 8"):
        interleaved_axes([0, 3, 3], 8)
    positions = _positions(16)
    sections = MultimodalRotaryEmbedding(kv_channels=32, rotary_percent=1.0)(positions, [6, 5, 5])
    interleaved = InterleavedMultimodalRotaryEmbedding(kv_channels=32, rotary_percent=1.0)(positions, [6, 5, 5])
    assert sections.shape == interleaved.shape
    assert not torch.allclose(sections, interleaved)
    # Text (all three positions equal) gets the same angles from either layout.
    text = positions[:1].expand(3, -1, -1)
    torch.testing.assert_close(MultimodalRotaryEmbedding(kv_channels=32, rotary_percent=1.0)(text, [6, 5, 5]),
                               InterleavedMultimodalRotaryEmbedding(kv_channels=32, rotary_percent=1.0)(text, [6, 5, 5]))


def test_the_model_takes_the_layout_from_the_config(megatron_world):
    from megavl.models.build import build_model
    from megavl.models.interleaved_mrope import InterleavedMultimodalRotaryEmbedding

    config = load_config(str(TINY_CONFIG), ["model.lm.mrope_layout=interleaved", "model.lm.mrope_section=[6,5,5]"])
    model = build_model(config)
    assert type(model.language_model.rotary_pos_emb) is InterleavedMultimodalRotaryEmbedding
    default = build_model(load_config(str(TINY_CONFIG)))
    assert type(default.language_model.rotary_pos_emb) is not InterleavedMultimodalRotaryEmbedding


@pytest.mark.parametrize("overrides, message", [
    (["model.lm.mrope_layout=interleaved", "model.lm.mrope_section=[2,8,6]"],
     r"mrope_section = \[2, 8, 6\] with model.lm.mrope_layout = interleaved: .* at most 5 \(height\) and 5 \(width\)"),
    (["model.lm.mrope_layout=interleaved", "model.lm.rope=1d"], r"mrope_layout = interleaved: lays out multimodal"),
    (["model.lm.mrope_layout=spiral"], r"model.lm.mrope_layout.*'spiral'"),
])
def test_bad_layouts_are_refused_with_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(str(TINY_CONFIG), overrides), 1)


def test_qwen2_vl_exports_refuse_the_interleaved_layout():
    from megavl.convert.qwen_vl import lm_export_problems

    config = load_config(str(TINY_CONFIG), ["model.lm.mrope_layout=interleaved", "model.lm.mrope_section=[6,5,5]"])
    for megavl_features in (False, True):
        assert any("mrope_layout = interleaved: Qwen2-VL and Qwen2.5-VL lay multimodal RoPE out in sections" in p
                   for p in lm_export_problems(config, megavl_features))
    assert not any("mrope_layout" in p for p in lm_export_problems(load_config(str(TINY_CONFIG)), True))
