"""The mapping classes on hand-made tensors: megatron's layouts, inverses, wildcard tables."""

from __future__ import annotations

import pytest
import torch

from megavl.convert.errors import ConversionError
from megavl.convert.mapping import (
    QKV,
    BoundMapping,
    Direct,
    FusedQKV,
    GatedMLP,
    MappingTable,
    MegavlOnly,
    StackedExperts,
)


def _rows(prefix: int, n: int, width: int = 3) -> torch.Tensor:
    """n rows whose values say where they came from: prefix * 100 + row."""
    return (prefix * 100 + torch.arange(n, dtype=torch.float32))[:, None].repeat(1, width)


def test_qkv_interleaves_query_groups_like_megatron():
    heads, groups, head_dim = 4, 2, 2
    q, k, v = _rows(1, heads * head_dim), _rows(2, groups * head_dim), _rows(3, groups * head_dim)
    fused = QKV("qkv", "q", "k", "v", heads, groups).to_megavl([q, k, v])
    # Group g: its 2 query heads (4 rows), then its key head, then its value head.
    expected = [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]
    assert fused[:, 0].tolist() == expected


def test_qkv_biases_and_inverse():
    mapping = QKV("b", "q", "k", "v", heads=4, groups=2)
    q, k, v = torch.randn(8), torch.randn(4), torch.randn(4)
    back = mapping.to_hf(mapping.to_megavl([q, k, v]))
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))
    assert BoundMapping(("b",), ("q", "k", "v"), mapping).hf_shapes([(16, 5)]) == [(8, 5), (4, 5), (4, 5)]


def test_fused_qkv_splits_thirds_then_interleaves():
    heads, head_dim = 2, 2
    qkv = torch.cat([_rows(1, heads * head_dim), _rows(2, heads * head_dim), _rows(3, heads * head_dim)])
    mapping = FusedQKV("qkv", "attn.qkv", heads, heads)
    fused = mapping.to_megavl([qkv])
    assert fused[:, 0].tolist() == [100, 101, 200, 201, 300, 301, 102, 103, 202, 203, 302, 303]
    assert torch.equal(mapping.to_hf(fused)[0], qkv)


def test_gated_mlp_is_gate_then_up():
    gate, up = _rows(1, 3), _rows(2, 3)
    mapping = GatedMLP("fc1", "gate", "up")
    fc1 = mapping.to_megavl([gate, up])
    assert fc1[:, 0].tolist() == [100, 101, 102, 200, 201, 202]
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(fc1), [gate, up]))


def test_table_fills_wildcards_and_names_unmapped_tensors():
    table = MappingTable([Direct("layers.*.w", "model.layers.*.weight"), Direct("emb", "embed")])
    bound = table.bind(["emb", "layers.0.w", "layers.11.w"])
    assert [b.hf for b in bound] == [("embed",), ("model.layers.0.weight",), ("model.layers.11.weight",)]
    with pytest.raises(ConversionError, match=r"no mapping for megavl tensor layers\.0\.router"):
        table.bind(["layers.0.w", "layers.0.router"])


def test_wildcard_counts_must_agree():
    with pytest.raises(ValueError, match="same number of"):
        Direct("layers.*.w", "model.weight")


def test_transformer_engine_names_map_to_the_local_spec_names_the_tables_use():
    from megavl.convert.megavl_model import canonical_name

    prefix = "language_model.decoder.layers.3."
    assert canonical_name(prefix + "self_attention.linear_qkv.layer_norm_weight") == prefix + "input_layernorm.weight"
    assert canonical_name("vision.layers.0.mlp.linear_fc1.layer_norm_bias") == "vision.layers.0.pre_mlp_layernorm.bias"
    assert canonical_name(prefix + "self_attention.linear_qkv.weight") == prefix + "self_attention.linear_qkv.weight"


def test_stacked_experts_gather_per_expert_tensors_into_one_transposed_tensor():
    mapping = StackedExperts("layers.*.experts.*.fc1", "model.layers.*.experts.gate_up_proj", transpose=True)
    table = MappingTable([mapping])
    experts = {f"layers.2.experts.{e}.fc1": torch.randn(6, 4) for e in (1, 0, 2)}
    (bound,) = table.bind(experts)
    assert bound.megavl == ("layers.2.experts.0.fc1", "layers.2.experts.1.fc1", "layers.2.experts.2.fc1")
    assert bound.hf == ("model.layers.2.experts.gate_up_proj",)
    (stacked,) = bound.to_hf([experts[n] for n in bound.megavl])
    assert stacked.shape == (3, 4, 6) and torch.equal(stacked[1], experts["layers.2.experts.1.fc1"].t())
    assert bound.hf_shapes([(6, 4)] * 3) == [(3, 4, 6)]
    back = bound.to_megavl([stacked])
    assert all(torch.equal(b, experts[n]) for b, n in zip(back, bound.megavl))
    with pytest.raises(ConversionError, match=r"no tensors for experts \[1\]"):
        table.bind(["layers.0.experts.0.fc1", "layers.0.experts.2.fc1"])


def test_megavl_only_tensors_are_left_out_of_the_export():
    table = MappingTable([Direct("w", "weight"), MegavlOnly("lora_*")])
    bound = table.bind(["w", "lora_0", "lora_1"])
    assert [(b.megavl, b.hf) for b in bound] == [(("w",), ("weight",)), (("lora_0",), ()), (("lora_1",), ())]
    assert bound[1].to_hf([torch.ones(2)]) == [] and bound[1].to_megavl([]) == []
