"""Where every parameter of the model lives in a parallel layout, and how many one GPU holds.

The model is described as groups of parameters (a weight matrix, its bias, a
norm), each with its unsharded size, the pipeline stage that holds it and how
it is split:

* ``replicated``: whole on every rank of its stage (norms, row-parallel biases,
  the patch embedding, the router, the LoRA factor on the unsplit side);
* ``tensor``: split over parallel.tensor (column / row / vocab-parallel linears);
* ``expert``: the experts split over parallel.expert, each expert's matrices
  over parallel.expert_tensor;
* ``expert_lora``: the experts' vision LoRA, split over parallel.expert only
  (validation allows expert LoRA with expert_tensor = 1 only).

The unsharded totals per component equal ``megavl.models.param_count`` (a test
checks it), so the planner and ``pretrain_vlm.py --dry-run`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from megavl.config import Config, lm_head_dim, lm_layers_per_stage
from megavl.models.param_count import (
    active_language_model_parameters,
    adapter_parameter_pieces,
    total_parameter_counts,
    vision_parameter_pieces,
)

Shard = Literal["replicated", "tensor", "expert", "expert_lora"]
Placement = Literal["first_stage", "last_stage", "lm_layer"]
COMPONENTS = ("vision", "adapter", "language_model")


@dataclass(frozen=True)
class ParameterGroup:
    component: str
    name: str
    count: int  # unsharded
    placement: Placement
    shard: Shard
    layer: Optional[int] = None  # the LM layer, for placement "lm_layer"
    trainable: bool = True
    # A second copy of a parameter counted elsewhere (tied embeddings on the last stage).
    copy: bool = False

    @property
    def is_expert(self) -> bool:
        return self.shard in ("expert", "expert_lora")


def _vision_groups(config: Config) -> list[ParameterGroup]:
    return [ParameterGroup("vision", name, count, "first_stage", shard)
            for name, count, shard in vision_parameter_pieces(config)]


def _adapter_groups(config: Config) -> list[ParameterGroup]:
    return [ParameterGroup("adapter", name, count, "first_stage", shard)
            for name, count, shard in adapter_parameter_pieces(config)]


def _lm_layer_groups(config: Config, layer: int) -> list[ParameterGroup]:
    lm, moe = config.model.lm, config.model.lm.moe
    lora = lm.vision_lora
    h, heads, groups_ = lm.hidden_size, lm.num_attention_heads, lm.num_query_groups
    d = lm_head_dim(lm)
    qkv_out = (heads + 2 * groups_) * d
    ra, rm = lora.attn_rank, lora.mlp_rank

    def group(name, count, shard, trainable=True):
        return ParameterGroup("language_model", name, count, "lm_layer", shard, layer=layer, trainable=trainable)

    out = [
        group("norms", 2 * h, "replicated"),
        group("qkv weight" + (" + bias" if lm.qkv_bias else ""), qkv_out * h + (qkv_out if lm.qkv_bias else 0),
              "tensor"),
        group("attention output weight", heads * d * h, "tensor"),
    ]
    if lm.qk_layernorm:
        out.append(group("q/k norms", 2 * d, "replicated"))
    if ra:
        # Column-parallel QKV: A sees the whole input, B follows the split output.
        # Row-parallel output projection: A follows the split input, B is whole.
        out += [
            group("attention LoRA (whole factors)", ra * h + h * ra, "replicated", lora.enabled),
            group("attention LoRA (split factors)", qkv_out * ra + ra * heads * d, "tensor", lora.enabled),
        ]
    if moe.num_experts and layer not in moe.dense_layers:
        ffn = moe.ffn_hidden_size or lm.ffn_hidden_size
        out += [
            group("router", moe.num_experts * h, "replicated"),
            group(f"{moe.num_experts} experts", moe.num_experts * 3 * ffn * h, "expert"),
        ]
        if rm:
            out.append(group(f"{moe.num_experts} experts' LoRA",
                             moe.num_experts * (rm * (h + 2 * ffn) + rm * (ffn + h)), "expert_lora", lora.enabled))
        if moe.shared_expert_ffn_hidden_size:
            out.append(group("shared expert", 3 * moe.shared_expert_ffn_hidden_size * h, "tensor"))
    else:
        ffn = lm.ffn_hidden_size
        out.append(group("MLP", 3 * ffn * h, "tensor"))
        if rm:
            out += [
                group("MLP LoRA (whole factors)", rm * h + h * rm, "replicated", lora.enabled),
                group("MLP LoRA (split factors)", 2 * ffn * rm + rm * ffn, "tensor", lora.enabled),
            ]
    return out


def parameter_groups(config: Config) -> list[ParameterGroup]:
    lm = config.model.lm
    embedding = lm.vocab_size * lm.hidden_size
    groups = _vision_groups(config) + _adapter_groups(config)
    groups.append(ParameterGroup("language_model", "input embedding", embedding, "first_stage", "tensor"))
    for layer in range(lm.num_layers):
        groups += _lm_layer_groups(config, layer)
    groups.append(ParameterGroup("language_model", "final norm", lm.hidden_size, "last_stage", "replicated"))
    if not lm.tie_embeddings:
        groups.append(ParameterGroup("language_model", "output layer", embedding, "last_stage", "tensor"))
    elif config.parallel.pipeline > 1:
        # megatron keeps a copy of tied embeddings on the last stage for the output
        # layer (its gradient is summed with the first stage's); it has its own state.
        groups.append(ParameterGroup("language_model", "output layer (tied copy)", embedding, "last_stage",
                                     "tensor", copy=True))
    return groups


def component_totals(config: Config) -> dict[str, int]:
    """Unsharded parameters per component from the groups (copies excluded)."""
    totals = dict.fromkeys(COMPONENTS, 0)
    for g in parameter_groups(config):
        if not g.copy:
            totals[g.component] += g.count
    return totals


@dataclass(frozen=True)
class ComponentCounts:
    total: int
    active: int  # passed through by one token (top-k experts only)


def model_parameters(config: Config) -> dict[str, ComponentCounts]:
    """Total and active-per-token parameters per component, as the dry run counts them."""
    totals = total_parameter_counts(config)
    active = dict(totals)
    active["language_model"] = active_language_model_parameters(config)
    return {name: ComponentCounts(totals[name], active[name]) for name in COMPONENTS}


def _divisor(config: Config, shard: Shard) -> int:
    p = config.parallel
    return {"replicated": 1, "tensor": p.tensor, "expert": p.expert * p.expert_tensor,
            "expert_lora": p.expert}[shard]


def stage_groups(config: Config, stage: int) -> list[ParameterGroup]:
    """The groups pipeline stage `stage` (0-based) holds."""
    split = lm_layers_per_stage(config)
    first_layer = sum(split[:stage])
    layers = range(first_layer, first_layer + split[stage])
    last = config.parallel.pipeline - 1
    held = []
    for g in parameter_groups(config):
        if (g.placement == "first_stage" and stage == 0) or (g.placement == "last_stage" and stage == last) \
                or (g.placement == "lm_layer" and g.layer in layers):
            held.append(g)
    return held


@dataclass(frozen=True)
class GPUParameters:
    """Parameters one GPU of a pipeline stage holds (its shards), split as the optimizer splits them."""

    stage: int
    dense: int
    expert: int
    trainable_dense: int
    trainable_expert: int
    by_component: dict[str, int]

    @property
    def total(self) -> int:
        return self.dense + self.expert


def gpu_parameters(config: Config, stage: int) -> GPUParameters:
    dense = expert = trainable_dense = trainable_expert = 0
    by_component = dict.fromkeys(COMPONENTS, 0)
    for g in stage_groups(config, stage):
        local = g.count // _divisor(config, g.shard)
        by_component[g.component] += local
        if g.is_expert:
            expert += local
            trainable_expert += local if g.trainable else 0
        else:
            dense += local
            trainable_dense += local if g.trainable else 0
    return GPUParameters(stage, dense, expert, trainable_dense, trainable_expert, by_component)
