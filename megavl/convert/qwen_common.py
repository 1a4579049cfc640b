"""What Qwen2-VL and Qwen2.5-VL share: the Qwen2 language model, the patch-merger
adapter's linears, special tokens and the image processor settings.

Hugging Face names here are the saved (safetensors) names, which differ from the
names of the loaded modules (transformers renames on load).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional

from megavl.config import Config, LMConfig, VisionConfig
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.mapping import QKV, Direct, GatedMLP, Mapping, MegavlOnly, Replicated, SharedLoRAInput
from megavl.data import tokenizer as tok
from megavl.data.images import IMAGE_MEAN, IMAGE_STD

# Names written by transformers 4.52-4.5x, which saved the loaded module tree.
HF_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))

# Both architectures hard-code this epsilon for every vision norm and the merger's.
VISION_NORM_EPS = 1e-6

_LM = "language_model.decoder.layers.*."
_HF = "model.layers.*."

CAUSAL_NOTE = (
    "model.lm.image_attention = causal: Hugging Face's Qwen models attend causally over image "
    "tokens; megavl's default (bidirectional) would change the logits"
)
LORA_NOTE = (
    "model.lm.vision_lora.mlp_rank = attn_rank = 0: the Hugging Face model has no vision-only "
    "LoRA adapters"
)
_LORA_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def lm_mappings(config: Config, with_lora: bool = False) -> list[Mapping]:
    lm = config.model.lm
    heads, groups = lm.num_attention_heads, lm.num_query_groups
    mappings: list[Mapping] = [
        Direct("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        Replicated(_LM + "input_layernorm.weight", _HF + "input_layernorm.weight"),
        QKV(_LM + "self_attention.linear_qkv.weight", _HF + "self_attn.q_proj.weight",
            _HF + "self_attn.k_proj.weight", _HF + "self_attn.v_proj.weight", heads, groups),
        QKV(_LM + "self_attention.linear_qkv.bias", _HF + "self_attn.q_proj.bias",
            _HF + "self_attn.k_proj.bias", _HF + "self_attn.v_proj.bias", heads, groups),
        Direct(_LM + "self_attention.linear_proj.weight", _HF + "self_attn.o_proj.weight"),
        Replicated(_LM + "pre_mlp_layernorm.weight", _HF + "post_attention_layernorm.weight"),
        GatedMLP(_LM + "mlp.linear_fc1.weight", _HF + "mlp.gate_proj.weight", _HF + "mlp.up_proj.weight"),
        Direct(_LM + "mlp.linear_fc2.weight", _HF + "mlp.down_proj.weight"),
        Replicated("language_model.decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not lm.tie_embeddings:
        mappings.append(Direct("language_model.output_layer.weight", "lm_head.weight"))
    if with_lora:
        mappings += lora_mappings(config)
    else:
        # Vision-only LoRA adapters exist only in megavl; lm_export_problems refuses
        # a model in which they are active.
        mappings += [MegavlOnly(f"{_LM}{linear}.{part}") for linear in _LORA_LINEARS for part in ("lora_a", "lora_b")]
    return mappings


def lora_mappings(config: Config) -> list[Mapping]:
    """Vision-only LoRA adapters <-> the lora_a / lora_b of megavl's remote-code model class."""
    lm = config.model.lm
    heads, groups = lm.num_attention_heads, lm.num_query_groups
    attn = _HF + "self_attn."
    return [
        SharedLoRAInput(_LM + "self_attention.linear_qkv.lora_a",
                        attn + "q_proj.lora_a", attn + "k_proj.lora_a", attn + "v_proj.lora_a"),
        QKV(_LM + "self_attention.linear_qkv.lora_b",
            attn + "q_proj.lora_b", attn + "k_proj.lora_b", attn + "v_proj.lora_b", heads, groups),
        Direct(_LM + "self_attention.linear_proj.lora_a", attn + "o_proj.lora_a"),
        Direct(_LM + "self_attention.linear_proj.lora_b", attn + "o_proj.lora_b"),
        SharedLoRAInput(_LM + "mlp.linear_fc1.lora_a", _HF + "mlp.gate_proj.lora_a", _HF + "mlp.up_proj.lora_a"),
        GatedMLP(_LM + "mlp.linear_fc1.lora_b", _HF + "mlp.gate_proj.lora_b", _HF + "mlp.up_proj.lora_b"),
        Direct(_LM + "mlp.linear_fc2.lora_a", _HF + "mlp.down_proj.lora_a"),
        Direct(_LM + "mlp.linear_fc2.lora_b", _HF + "mlp.down_proj.lora_b"),
    ]


def ignorable_hf_tensors(config: Config) -> tuple[str, ...]:
    # A tied model's head is the embedding; some checkpoints store it anyway.
    return ("lm_head.weight",) if config.model.lm.tie_embeddings else ()


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


def dtype_name(hf_config) -> tuple[str, Optional[str]]:
    """megavl's train.dtype for the checkpoint's dtype, and a note when it had to differ."""
    raw = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(raw).replace("torch.", "") if raw is not None else "float32"
    if name == "bfloat16":
        return "bf16", None
    if name == "float32":
        return "fp32", None
    return "fp32", f"train.dtype = fp32: the checkpoint's dtype {name} is not a megavl dtype; weights are upcast"


def lm_config(hf_config, problems: list[str]) -> LMConfig:
    text = hf_config.text_config
    if text.hidden_act != "silu":
        problems.append(f"text_config.hidden_act = {text.hidden_act!r}: megavl's LM MLP is SwiGLU (silu)")
    if getattr(text, "use_sliding_window", False):
        problems.append("text_config.use_sliding_window = true: megavl's LM has no sliding-window attention")
    head_dim = getattr(text, "head_dim", None)
    if head_dim is not None and head_dim * text.num_attention_heads != text.hidden_size:
        problems.append(
            f"text_config.head_dim = {head_dim}: megavl needs hidden_size / num_attention_heads "
            f"= {text.hidden_size // text.num_attention_heads}"
        )
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        problems.append(f"text_config.rope_parameters.rope_type = {rope_type!r}: only default multimodal RoPE is supported")
    section = rope.get("mrope_section")
    if not section:
        problems.append("text_config.rope_parameters.mrope_section is missing: megavl needs multimodal RoPE sections")
        section = LMConfig().mrope_section
    return dataclasses.replace(
        LMConfig(),
        **hf_lm_shape(text, rope, bool(hf_config.tie_word_embeddings), hf_config.image_token_id),
        qkv_bias=True,
        qk_layernorm=False,
        rope="mrope",
        mrope_section=[int(x) for x in section],
    )


def hf_lm_shape(text, rope: dict, tie_embeddings: bool, image_token_id: int) -> dict:
    """LMConfig fields every Qwen text config gives the same way.

    The imported model attends causally over images and has no vision adapters,
    as the Hugging Face model it reproduces.
    """
    defaults = LMConfig()
    return dict(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads or text.num_attention_heads,
        ffn_hidden_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
        tie_embeddings=tie_embeddings,
        norm_eps=float(text.rms_norm_eps),
        max_position_embeddings=text.max_position_embeddings,
        image_attention="causal",
        image_token_id=image_token_id,
        vision_lora=dataclasses.replace(defaults.vision_lora, mlp_rank=0, attn_rank=0),
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
    for key, megavl_value in (("image_mean", IMAGE_MEAN), ("image_std", IMAGE_STD)):
        value = preprocessor.get(key)
        if value is not None and any(abs(a - b) > 1e-6 for a, b in zip(value, megavl_value)):
            notes.append(f"preprocessor_config.json {key} = {value}: megavl's image pipeline uses {list(megavl_value)}")


# ---------------------------------------------------------------------------
# megavl -> config.json
# ---------------------------------------------------------------------------


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


def text_config_fields(config: Config) -> dict:
    lm = config.model.lm
    return dict(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads,
        num_key_value_heads=lm.num_query_groups,
        hidden_act="silu",
        max_position_embeddings=lm.max_position_embeddings,
        rms_norm_eps=lm.norm_eps,
        use_sliding_window=False,
        rope_parameters={"rope_type": "default", "mrope_section": list(lm.mrope_section), "rope_theta": lm.rope_theta},
    )


_TOP_TOKEN_KEYS = ("vision_start_token_id", "vision_end_token_id", "video_token_id")
_TEXT_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_fields(token_ids: dict, base: Optional[dict]) -> tuple[dict, dict]:
    """(top-level, text_config) special-token ids: a tokenizer's first, then the imported
    config.json's, then megavl's tokenizer layout (special tokens at fixed ids)."""
    defaults = {
        "vision_start_token_id": tok.SPECIAL_TOKENS.index(tok.VISION_START),
        "vision_end_token_id": tok.SPECIAL_TOKENS.index(tok.VISION_END),
        "bos_token_id": tok.SPECIAL_TOKENS.index(tok.ENDOFTEXT),
        "eos_token_id": tok.SPECIAL_TOKENS.index(tok.IM_END),
        "pad_token_id": tok.SPECIAL_TOKENS.index(tok.ENDOFTEXT),
    }
    base = base or {}
    base_text = base.get("text_config") or base

    def pick(key: str, source: dict) -> Any:
        if key in token_ids:
            return token_ids[key]
        if key in source:
            return source[key]
        return defaults.get(key)

    top = {k: v for k in _TOP_TOKEN_KEYS if (v := pick(k, base)) is not None}
    text = {k: pick(k, base_text) for k in _TEXT_TOKEN_KEYS}
    return top, text


def tokenizer_token_ids(tokenizer) -> dict:
    """Special-token ids of a megavl or Qwen tokenizer, as config.json fields."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for key, token in (("vision_start_token_id", tok.VISION_START), ("vision_end_token_id", tok.VISION_END),
                       ("video_token_id", "<|video_pad|>"), ("bos_token_id", tok.ENDOFTEXT)):
        if token in vocab:
            ids[key] = vocab[token]
    if tokenizer.eos_token_id is not None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = tokenizer.pad_token_id
    return ids


def preprocessor_config(config: Config) -> dict:
    """preprocessor_config.json for Qwen2-VL's image processor with megavl's image settings."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    v, d = config.model.vision, config.data.resolution
    processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": d.min_pixels, "longest_edge": d.max_pixels},
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.spatial_merge_size,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    data = processor.to_dict()
    # Readers from transformers 4.x look for these instead of "size".
    data["min_pixels"], data["max_pixels"] = d.min_pixels, d.max_pixels
    return data


class QwenVLArchitecture(Architecture):
    """What Qwen2-VL and Qwen2.5-VL do alike: the config translation around the
    vision tower, which each subclass describes (megavl_vision, hf_vision_fields)."""

    @abc.abstractmethod
    def megavl_vision(self, hf_config, problems: list[str]) -> VisionConfig:
        """megavl's vision tower for hf_config.vision_config; problems collects what cannot be reproduced."""

    @abc.abstractmethod
    def hf_vision_fields(self, config: Config, base: Optional[dict]) -> dict:
        """The vision_config fields of config.json for config's vision tower."""

    def megavl_config(self, hf_config, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
        problems: list[str] = []
        notes = [CAUSAL_NOTE, LORA_NOTE]
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
        base = base if base and self.name in (base.get("architectures") or []) else None
        top_tokens, text_tokens = token_fields(token_ids, base)
        hf = self.config_class()(
            text_config={**text_config_fields(config), **text_tokens},
            vision_config=self.hf_vision_fields(config, base),
            image_token_id=lm.image_token_id,
            tie_word_embeddings=lm.tie_embeddings,
            **top_tokens,
        )
        hf.architectures = [self.name]
        return hf
