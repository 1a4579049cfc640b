"""What Qwen2-VL and Qwen2.5-VL share: the mapping table (each describes only its
vision MLP), the config translation around the vision tower (each describes
only the fields it gives its own way), the patch-merger adapter's linears and
the image processor settings. Their language model is Qwen2's
(megavl.convert.qwen_lm).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Optional, Sequence

from megavl.config import Config, LMConfig, VisionConfig
from megavl.convert import qwen_lm
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.fields import Field, FieldTable, dtype_name
from megavl.convert.mapping import Direct, FusedQKV, Mapping, MappingTable, PatchEmbedConv3d, Replicated
from megavl.convert.tokens import vl_token_fields
from megavl.config.towers import image_normalisation

# Names written by transformers 4.52-4.5x, which saved the loaded module tree.
HF_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# A vision layer's tensors in megavl and in both architectures' checkpoints.
VISION_LAYER = "vision.layers.*."
HF_VISION_BLOCK = "visual.blocks.*."

# Both architectures hard-code this epsilon for every vision norm and the merger's.
VISION_NORM_EPS = 1e-6

# megavl's VisionConfig fields and the vision_config fields of the same meaning in both.
VISION_FIELDS = FieldTable(
    Field("num_layers", "depth"),
    Field("num_attention_heads", "num_heads"),
    Field("patch_size", "patch_size"),
    Field("temporal_patch_size", "temporal_patch_size"),
    Field("in_channels", "in_channels"),
    Field("spatial_merge_size", "spatial_merge_size"),
)


def vision_mappings(config: Config, norm_bias: bool, mlp: list[Mapping]) -> list[Mapping]:
    """The vision tower's mappings: what both architectures share, their norms' biases
    (norm_bias: LayerNorms), and mlp, each layer's MLP."""
    v, hf = VISION_LAYER, HF_VISION_BLOCK
    heads = config.model.vision.num_attention_heads
    mappings: list[Mapping] = [
        PatchEmbedConv3d("vision.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
        Replicated(v + "input_layernorm.weight", hf + "norm1.weight"),
        FusedQKV(v + "self_attention.linear_qkv.weight", hf + "attn.qkv.weight", heads, heads),
        FusedQKV(v + "self_attention.linear_qkv.bias", hf + "attn.qkv.bias", heads, heads),
        Direct(v + "self_attention.linear_proj.weight", hf + "attn.proj.weight"),
        Replicated(v + "self_attention.linear_proj.bias", hf + "attn.proj.bias"),
        Replicated(v + "pre_mlp_layernorm.weight", hf + "norm2.weight"),
    ]
    if norm_bias:
        mappings += [
            Replicated(v + "input_layernorm.bias", hf + "norm1.bias"),
            Replicated(v + "pre_mlp_layernorm.bias", hf + "norm2.bias"),
        ]
    return mappings + mlp


def adapter_mappings(norm_bias: bool) -> list[Mapping]:
    mappings: list[Mapping] = [
        Replicated("adapter.norm.weight", "visual.merger.ln_q.weight"),
        Direct("adapter.linear_fc1.weight", "visual.merger.mlp.0.weight"),
        Direct("adapter.linear_fc1.bias", "visual.merger.mlp.0.bias"),
        Direct("adapter.linear_fc2.weight", "visual.merger.mlp.2.weight"),
        Replicated("adapter.linear_fc2.bias", "visual.merger.mlp.2.bias"),
    ]
    if norm_bias:
        mappings.append(Replicated("adapter.norm.bias", "visual.merger.ln_q.bias"))
    return mappings


# ---------------------------------------------------------------------------
# config.json -> megavl
# ---------------------------------------------------------------------------


def lm_config(hf_config, problems: list[str]) -> LMConfig:
    """megavl's LM for a Qwen2-VL / Qwen2.5-VL config's text_config."""
    text = hf_config.text_config
    rope = qwen_lm.check_text_config(text, "text_config.", ("default", "mrope"), problems)
    section = rope.get("mrope_section")
    if not section:
        problems.append("text_config.rope_parameters.mrope_section is missing: megavl needs multimodal RoPE sections")
        section = LMConfig().mrope_section
    return dataclasses.replace(
        LMConfig(),
        **qwen_lm.lm_fields_from_hf(text, rope, bool(hf_config.tie_word_embeddings), hf_config.image_token_id),
        qkv_bias=True,
        qk_layernorm=False,
        rope="mrope",
        mrope_section=[int(x) for x in section],
    )


def apply_preprocessor(config: Config, preprocessor: Optional[dict], problems: list[str], notes: list[str]) -> None:
    """Image-size limits from preprocessor_config.json into config.data."""
    if preprocessor is None:
        notes.append(
            f"no preprocessor_config.json: data.resolution.min_pixels / max_pixels keep megavl's defaults "
            f"({config.data.resolution.min_pixels} / {config.data.resolution.max_pixels})"
        )
        return
    size = preprocessor.get("size") or {}
    low = size.get("shortest_edge", preprocessor.get("min_pixels"))
    high = size.get("longest_edge", preprocessor.get("max_pixels"))
    if low is not None:
        config.data.resolution.min_pixels = int(low)
    if high is not None:
        config.data.resolution.max_pixels = int(high)
    v = config.model.vision
    for key, expected in (("patch_size", v.patch_size), ("temporal_patch_size", v.temporal_patch_size),
                          ("merge_size", v.spatial_merge_size)):
        if key in preprocessor and preprocessor[key] != expected:
            problems.append(f"preprocessor_config.json {key} = {preprocessor[key]}: the vision tower uses {expected}")
    apply_normalisation(v, preprocessor)


def apply_normalisation(vision, preprocessor: dict) -> None:
    """preprocessor_config.json's image_mean / image_std into model.vision where they are not the
    tower kind's own (which a null field stands for)."""
    for key, kind_value in zip(("image_mean", "image_std"), image_normalisation(dataclasses.replace(
            vision, image_mean=None, image_std=None))):
        value = preprocessor.get(key)
        if value is not None and any(abs(a - b) > 1e-6 for a, b in zip(value, kind_value)):
            setattr(vision, key, [float(x) for x in value])


# ---------------------------------------------------------------------------
# megavl -> config.json
# ---------------------------------------------------------------------------


def tower_export_problems(config: Config, kind: str, architecture: str) -> list[str]:
    """Why config's vision tower, projector or image positions are not `architecture`'s
    (a Qwen tower of model.vision.kind `kind`, the merge_mlp projector, spatial positions)."""
    v, a, lm = config.model.vision, config.model.adapter, config.model.lm
    problems = []
    if v.kind != kind:
        problems.append(f"model.vision.kind = {v.kind}: {architecture}'s vision tower is {kind}")
    if a.kind != "merge_mlp" or not a.bias:
        problems.append(
            f"model.adapter.kind = {a.kind}, bias = {a.bias}: {architecture}'s projector is merge_mlp with biases"
        )
    if lm.image_positions != "spatial":
        problems.append(
            f"model.lm.image_positions = {lm.image_positions}: {architecture} numbers image tokens with "
            "multimodal RoPE (spatial)"
        )
    return problems


def lm_export_problems(config: Config, megavl_features: bool = False) -> list[str]:
    """Why the Qwen2 LM cannot reproduce config's; megavl_features: the remote-code
    class, which also has bidirectional image attention and vision LoRA."""
    lm, problems = config.model.lm, []
    if lm.image_attention != "causal" and not megavl_features:
        problems.append(
            f"model.lm.image_attention = {lm.image_attention}: Hugging Face's model class attends causally "
            "over image tokens, so it would compute different outputs (megavl's remote-code class has it)"
        )
    if lm.rope != "mrope":
        problems.append(f"model.lm.rope = {lm.rope}: the Hugging Face LM uses multimodal RoPE (mrope)")
    elif lm.mrope_layout != "sections":
        problems.append(f"model.lm.mrope_layout = {lm.mrope_layout}: Qwen2-VL and Qwen2.5-VL lay multimodal RoPE "
                        "out in sections (the interleaved layout is Qwen3-VL's)")
    if not lm.qkv_bias:
        problems.append("model.lm.qkv_bias = false: the Hugging Face LM has q/k/v biases")
    if lm.qk_layernorm:
        problems.append("model.lm.qk_layernorm = true: the Hugging Face LM has no q/k norms")
    lora = getattr(lm, "vision_lora", None)
    if lora is not None and lora.enabled and (lora.mlp_rank or lora.attn_rank) and not megavl_features:
        problems.append(
            f"model.lm.vision_lora: mlp_rank = {lora.mlp_rank}, attn_rank = {lora.attn_rank}, enabled: the "
            "vision-only LoRA adapters change the outputs for image tokens, which Hugging Face's model class "
            "cannot express (megavl's remote-code class has them; a model whose adapters are disabled, "
            "enabled: false, is exported without them)"
        )
    if lm.head_dim is not None and lm.head_dim * lm.num_attention_heads != lm.hidden_size:
        problems.append(
            f"model.lm.head_dim = {lm.head_dim}: the Hugging Face LM's heads are hidden_size / num_attention_heads "
            f"= {lm.hidden_size // lm.num_attention_heads} wide (valid: null)"
        )
    experts = getattr(getattr(lm, "moe", None), "num_experts", 0)
    if experts:
        problems.append(f"model.lm.moe.num_experts = {experts}: this architecture's LM is dense")
    merged = config.model.vision.hidden_size * config.model.vision.spatial_merge_size**2
    adapter = config.model.adapter.ffn_hidden_size
    if adapter is not None and adapter != merged:
        problems.append(
            f"model.adapter.ffn_hidden_size = {adapter}: the Hugging Face merger's hidden width is the "
            f"merged patch width {merged} (use null)"
        )
    if config.model.vision.norm_eps != VISION_NORM_EPS:
        problems.append(f"model.vision.norm_eps = {config.model.vision.norm_eps}: Hugging Face hard-codes {VISION_NORM_EPS}")
    return problems


def preprocessor_config(config: Config) -> dict:
    """preprocessor_config.json for Qwen2-VL's image processor with megavl's image settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    v, d = config.model.vision, config.data.resolution
    mean, std = image_normalisation(v)
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": d.min_pixels, "longest_edge": d.max_pixels},
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
        image_mean=list(mean),
        image_std=list(std),
    )
    data = processor.to_dict()
    # Readers from transformers 4.x look for these instead of "size".
    data["min_pixels"], data["max_pixels"] = d.min_pixels, d.max_pixels
    return data


def vision_fields_from_hf(vision_config) -> dict:
    """VisionConfig fields both vision configs give the same way."""
    rope_theta = (vision_config.rope_parameters or {}).get("rope_theta", VisionConfig().rope_theta)
    return dict(VISION_FIELDS.from_hf(vision_config), norm_eps=VISION_NORM_EPS, rope_theta=float(rope_theta))


def vision_fields_to_hf(vision: VisionConfig) -> dict:
    """vision_config fields both vision configs take the same way."""
    return dict(VISION_FIELDS.to_hf(vision), rope_parameters={"rope_type": "axial", "rope_theta": vision.rope_theta})


class QwenVLArchitecture(Architecture):
    """What Qwen2-VL and Qwen2.5-VL do alike: the mapping table and the config
    translation around the vision tower, which each subclass describes
    (vision_mlp_mappings, megavl_vision_fields, hf_vision_fields)."""

    hf_aliases = HF_ALIASES
    vision_prefix = "visual."
    # Whether the vision tower's and the merger's norms are LayerNorms with biases
    # (Qwen2-VL) rather than RMSNorms.
    norm_bias = False
    # Whether the model class has megavl's bidirectional image attention and vision LoRA.
    megavl_features = False
    # vision_config.hidden_act, and what megavl's vision MLP is (for the message).
    vision_act: tuple[str, str] = ("", "")
    # The vision_config field holding the merger's output width, which must be the LM's.
    merger_width_field = ""

    @abc.abstractmethod
    def vision_mlp_mappings(self) -> list[Mapping]:
        """The mappings of a vision layer's MLP (names under VISION_LAYER and HF_VISION_BLOCK)."""

    @abc.abstractmethod
    def megavl_vision_fields(self, vision_config) -> dict:
        """The VisionConfig fields this architecture's vision_config gives its own way."""

    @abc.abstractmethod
    def hf_vision_fields(self, config: Config, base: Optional[dict]) -> dict:
        """The vision_config fields of config.json for config's vision tower."""

    def table(self, config: Config) -> MappingTable:
        with_lora = self.megavl_features and config.model.lm.vision_lora.enabled
        return MappingTable(
            vision_mappings(config, self.norm_bias, self.vision_mlp_mappings())
            + adapter_mappings(norm_bias=self.norm_bias)
            + qwen_lm.lm_mappings(config, with_lora=with_lora),
            ignorable_hf=qwen_lm.ignorable_hf_tensors(config),
        )

    def megavl_vision(self, hf_config, problems: list[str]) -> VisionConfig:
        """megavl's vision tower for hf_config.vision_config; problems collects what cannot be reproduced."""
        v = hf_config.vision_config
        act, mlp = self.vision_act
        if v.hidden_act != act:
            problems.append(f"vision_config.hidden_act = {v.hidden_act!r}: megavl's {mlp}")
        width, lm_width = getattr(v, self.merger_width_field), hf_config.text_config.hidden_size
        if width != lm_width:
            problems.append(
                f"vision_config.{self.merger_width_field} = {width}: must equal text_config.hidden_size ({lm_width})"
            )
        return dataclasses.replace(VisionConfig(), **vision_fields_from_hf(v), **self.megavl_vision_fields(v))

    def megavl_config(self, hf_configs: Sequence, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        (hf_config,) = hf_configs
        problems: list[str] = []
        notes = [qwen_lm.CAUSAL_NOTE, qwen_lm.LORA_NOTE]
        config = Config()
        config.model.vision = self.megavl_vision(hf_config, problems)
        config.model.lm = lm_config(hf_config, problems)
        config.train.dtype, dtype_note = dtype_name(hf_config)
        if dtype_note:
            notes.append(dtype_note)
        apply_preprocessor(config, preprocessor, problems, notes)
        if problems:
            raise ConversionError(
                f"{self.name}: megavl cannot reproduce this model:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return config, notes

    def hf_config(self, config: Config, token_ids: dict, base: Optional[dict]):
        lm = config.model.lm
        top_tokens, text_tokens = vl_token_fields(token_ids, base)
        hf = self.config_class()(
            text_config={**qwen_lm.lm_fields_to_hf(lm, mrope=True), **text_tokens},
            vision_config=self.hf_vision_fields(config, base),
            image_token_id=lm.image_token_id,
            tie_word_embeddings=lm.tie_embeddings,
            **top_tokens,
        )
        hf.architectures = [self.name]
        return hf

    def preprocessor_config(self, config: Config) -> Optional[dict]:
        return preprocessor_config(config)
