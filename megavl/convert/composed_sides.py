"""The two halves of a composed import: a vision tower and a text-only language model.

A composed VLM is a pretrained vision encoder from one Hugging Face folder, a fresh projector
and a pretrained causal LM from another (megavl.convert.composed runs the import). Each side
here knows the folders it reads (by config.json's model_type), how its config becomes
megavl's, which tensors it maps and which it leaves, and the Hugging Face model its outputs
are compared with.

Vision sides: SigLIP and CLIP, from a vision-model folder (SiglipVisionModel,
CLIPVisionModel) or a whole image-text model (SiglipModel, CLIPModel, whose text tower is
ignored); the tower of a whole Qwen2-VL / Qwen2.5-VL folder (its merger and LM are left), which
keeps native resolution and its own patch order. LM sides: Qwen2 / Qwen2.5, Qwen3 (dense), Llama (Llama 3, SmolLM2) and Qwen3-MoE.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megavl.config import LMConfig, VisionConfig
from megavl.convert import qwen3_moe, qwen_lm
from megavl.convert.errors import ConversionError
from megavl.convert.mapping import Mapping
from megavl.convert.vision_towers import tower_mappings, vision_config_from_hf


# ---------------------------------------------------------------------------
# Vision towers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSide:
    kind: str  # model.vision.kind
    vision_model_type: str  # config.json model_type of the vision model alone
    full_model_type: str  # ... of the image-text model holding it as vision_config
    config_class: str  # transformers' vision config class
    model_class: str  # transformers' vision model class (loads either folder)
    # The layer whose output the projector reads by default: SigLIP's last (after its
    # post_layernorm, as SiQ-VL and Idefics3 read it), CLIP's second to last (LLaVA's).
    default_feature_layer: int

    def hf_vision_config(self, data: dict, where: str):
        import transformers

        vision = data.get("vision_config") if data.get("model_type") == self.full_model_type else data
        if not isinstance(vision, dict):
            raise ConversionError(f"{where}: model_type {self.full_model_type} without a vision_config")
        try:
            return getattr(transformers, self.config_class).from_dict(vision)
        except Exception as e:  # transformers' own validation, whatever it raises
            raise ConversionError(f"{where}: transformers rejects its vision config: {e}") from e

    def feature_layers(self, hf_vision, feature_layer: Optional[int]) -> tuple[int, bool]:
        """(layers megavl keeps, whether the tower's final LayerNorm applies) for a feature layer
        counted like Hugging Face's hidden_states (-1 the last layer, -2 the one before, or 1..N).

        The final norm applies only to SigLIP's last layer: that is last_hidden_state, which
        SiQ-VL and Idefics3 project; LLaVA reads CLIP's hidden_states, which have no final norm.
        """
        total = hf_vision.num_hidden_layers
        layer = self.default_feature_layer if feature_layer is None else feature_layer
        keep = total + 1 + layer if layer < 0 else layer
        if not 1 <= keep <= total:
            raise ConversionError(
                f"--vision-layer {layer}: the tower has {total} layers; give -{total}..-1 (counted from the "
                f"last) or 1..{total}"
            )
        return keep, self.kind == "siglip" and keep == total

    def vision_config(self, hf_vision, feature_layer: Optional[int], merge: int) -> VisionConfig:
        keep, post_norm = self.feature_layers(hf_vision, feature_layer)
        return vision_config_from_hf(hf_vision, self.kind, post_norm=post_norm, merge=merge, num_layers=keep)

    def mappings(self, vision: VisionConfig, prefix: str) -> list[Mapping]:
        return tower_mappings(vision, prefix)

    def unused_tensors(self, names: Sequence[str], vision: VisionConfig, prefix: str) -> list[str]:
        """The folder's tower tensors megavl's tower does not hold: layers after the feature layer,
        the final norm when it does not apply, SigLIP's pooling head, stored position ids."""
        layer = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
        unused = []
        for name in names:
            rest = name[len(prefix):]
            m = layer.match(name)
            if (m and int(m.group(1)) >= vision.num_layers) or rest.startswith("head.") \
                    or (rest.startswith("post_layernorm.") and not vision.post_norm) \
                    or rest == "embeddings.position_ids":
                unused.append(name)
        return unused

    def tower_prefix(self, names: Sequence[str]) -> str:
        """Where the folder's tower tensors are: a whole image-text model (and older vision-model
        checkpoints) keeps them under vision_model.; transformers 5 saves a vision model alone
        without a prefix."""
        return "vision_model." if any(n.startswith("vision_model.") for n in names) else ""

    def native_resolution(self) -> bool:
        """Whether the tower takes images at their own size (else fixed squares of its position table)."""
        return False

    def image_regime(self, config, hf_vision, preprocessor: Optional[dict], problems: list[str],
                     notes: list[str]) -> None:
        """config.data.resolution and the pixel statistics for the tower: every image a square of
        its pretrained grid (e.g. 27 x 27 patches for SigLIP-384), normalised as its preprocessor says."""
        from megavl.convert.qwen_vl import apply_normalisation

        if preprocessor:
            apply_normalisation(config.model.vision, preprocessor)
        v = config.model.vision
        side, merge = v.image_size // v.patch_size, v.spatial_merge_size
        if side % merge:
            divisors = [f for f in range(1, side + 1) if side % f == 0]
            problems.append(
                f"--adapter-args factor={merge}: the tower's {side} x {side} patch grid (image_size "
                f"{v.image_size} / patch_size {v.patch_size}) does not split into {merge} x {merge} "
                f"blocks; valid factors: {', '.join(map(str, divisors))}"
            )
            return
        r = config.data.resolution
        r.mode, r.fixed_tokens, r.fixed_fit = "fixed", (side // merge) ** 2, "pad"

    def layers_note(self, vision: VisionConfig, hf_vision) -> str:
        return (f"the tower's features are read at layer {vision.num_layers} of {hf_vision.num_hidden_layers}"
                + (" after its final LayerNorm" if vision.post_norm else " (no final norm)"))

    def load_reference(self, folder: str):
        import transformers

        model = getattr(transformers, self.model_class).from_pretrained(
            folder, dtype=torch.float32, local_files_only=True)
        return model.eval()

    @torch.no_grad()
    def reference_features(self, model, image: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
        """[rows * cols, hidden] features of one [3, H, W] image from the Hugging Face tower, row-major,
        at the layer megavl's tower ends with."""
        out = model(pixel_values=image[None], output_hidden_states=True, interpolate_pos_encoding=True)
        if vision.post_norm:
            return out.last_hidden_state[0].float()
        features = out.hidden_states[vision.num_layers][0]  # hidden_states[0] is the embeddings
        return features[1:].float() if self.kind == "clip" else features.float()  # CLIP's class token


@dataclass(frozen=True)
class QwenVisionSide(VisionSide):
    """The vision tower of a whole Qwen2-VL / Qwen2.5-VL folder, read at its last layer before the
    merger (which, like the LM, is left: the projector is new). model_class names the tower's
    transformers class by its module path under transformers.models."""

    architecture: Any = None  # the QwenVLArchitecture describing the folder

    def hf_vision_config(self, data: dict, where: str):
        import transformers

        try:
            return getattr(transformers, self.config_class).from_dict(data).vision_config
        except Exception as e:  # transformers' own validation, whatever it raises
            raise ConversionError(f"{where}: transformers rejects it: {e}") from e

    def vision_config(self, hf_vision, feature_layer: Optional[int], merge: int) -> VisionConfig:
        from megavl.convert.qwen_vl import vision_fields_from_hf

        if feature_layer not in (None, -1, hf_vision.depth):
            raise ConversionError(f"--vision-layer {feature_layer}: a {self.kind} tower is read at its last layer "
                                  "(give -1 or leave it out)")
        side = hf_vision.spatial_merge_size
        if merge != side:
            raise ConversionError(
                f"--adapter-args factor={merge}: the {self.kind} tower orders its patches (and windows) in "
                f"{side} x {side} blocks (its spatial_merge_size); valid: factor={side} with merge_mlp or pixel_shuffle"
            )
        act, mlp = self.architecture.vision_act
        if hf_vision.hidden_act != act:
            raise ConversionError(f"vision_config.hidden_act = {hf_vision.hidden_act!r}: megavl's {mlp}")
        return dataclasses.replace(VisionConfig(), **vision_fields_from_hf(hf_vision),
                                   **self.architecture.megavl_vision_fields(hf_vision))

    def tower_prefix(self, names: Sequence[str]) -> str:
        # transformers 4.52-4.5x saved the loaded module tree (model.visual.).
        return "model.visual." if any(n.startswith("model.visual.") for n in names) else "visual."

    def native_resolution(self) -> bool:
        return True

    def image_regime(self, config, hf_vision, preprocessor: Optional[dict], problems: list[str],
                     notes: list[str]) -> None:
        from megavl.convert.qwen_vl import apply_preprocessor

        apply_preprocessor(config, preprocessor, problems, notes)

    def layers_note(self, vision: VisionConfig, hf_vision) -> str:
        return f"the tower's features are read at its last layer ({vision.num_layers}), before its merger"

    def mappings(self, vision: VisionConfig, prefix: str) -> list[Mapping]:
        from megavl.config import Config
        from megavl.convert.mapping import rehomed
        from megavl.convert.qwen_vl import vision_mappings

        config = Config()
        config.model.vision = vision
        arch = self.architecture
        return rehomed(vision_mappings(config, arch.norm_bias, arch.vision_mlp_mappings()), "visual.", prefix)

    def unused_tensors(self, names: Sequence[str], vision: VisionConfig, prefix: str) -> list[str]:
        return [name for name in names if name.startswith(prefix + "merger.")]

    def load_reference(self, folder: str):
        """The tower alone (not the whole VLM), with the folder's tower tensors."""
        import importlib

        from megavl.convert.hf_io import SafetensorsCheckpoint, read_hf_config

        module, name = self.model_class.rsplit(".", 1)
        tower_class = getattr(importlib.import_module(f"transformers.models.{module}"), name)
        tower = tower_class._from_config(self.hf_vision_config(read_hf_config(folder), folder)).float()
        checkpoint = SafetensorsCheckpoint(folder)
        prefix = self.tower_prefix(checkpoint.names())
        state = {n[len(prefix):]: checkpoint.get(n).float() for n in checkpoint.names() if n.startswith(prefix)}
        missing, unexpected = tower.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConversionError(f"{folder}: the {self.kind} tower's tensors do not match its class "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return tower.eval()

    @torch.no_grad()
    def reference_features(self, model, image: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
        """The tower's output before its merger, row-major. Qwen2.5-VL's is in window order, one
        merge block at a time, which the tower's own window index undoes."""
        from megavl.convert.vision_towers import row_major_features
        from megavl.data.image_patches import image_to_patches

        v, merge = vision, vision.spatial_merge_size
        patches, grid = image_to_patches(image, v.patch_size, v.temporal_patch_size, merge)
        grid_thw = torch.tensor([list(grid)])
        features = model(patches, grid_thw=grid_thw).last_hidden_state
        if self.kind == "qwen2_5_vl":
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=merge,
                                                      window_size=model.window_size, patch_size=model.patch_size)
            blocks = features.reshape(-1, merge * merge, features.shape[-1])
            features = blocks[torch.argsort(window_index)].reshape(-1, features.shape[-1])
        return row_major_features(features.float(), [grid], merge)[0]


def _qwen_sides() -> tuple[VisionSide, ...]:
    from megavl.convert.qwen2_5_vl import Qwen2_5_VL
    from megavl.convert.qwen2_vl import Qwen2_VL

    return (
        QwenVisionSide("qwen2_5_vl", "qwen2_5_vl", "qwen2_5_vl", "Qwen2_5_VLConfig",
                       "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel", -1, Qwen2_5_VL()),
        QwenVisionSide("qwen2_vl", "qwen2_vl", "qwen2_vl", "Qwen2VLConfig",
                       "qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel", -1, Qwen2_VL()),
    )


@dataclass(frozen=True)
class Siglip2VisionSide(VisionSide):
    """SigLIP2 (NaFlex): a SigLIP tower on images of their own aspect ratio, its position table
    resized bilinearly with antialiasing per patch grid, its patch embedding a linear over
    channel-last patches; native resolution up to the preprocessor's max_num_patches."""

    def vision_config(self, hf_vision, feature_layer: Optional[int], merge: int) -> VisionConfig:
        keep, post_norm = self.feature_layers(hf_vision, feature_layer)
        return vision_config_from_hf(hf_vision, "siglip", post_norm=post_norm, merge=merge, num_layers=keep,
                                     interpolation="bilinear_antialias")

    def feature_layers(self, hf_vision, feature_layer: Optional[int]) -> tuple[int, bool]:
        keep, _ = super().feature_layers(hf_vision, feature_layer)
        return keep, keep == hf_vision.num_hidden_layers

    def mappings(self, vision: VisionConfig, prefix: str) -> list[Mapping]:
        return tower_mappings(vision, prefix, linear_patches=True)

    def native_resolution(self) -> bool:
        return True

    def image_regime(self, config, hf_vision, preprocessor: Optional[dict], problems: list[str],
                     notes: list[str]) -> None:
        from megavl.convert.qwen_vl import apply_normalisation

        v, r = config.model.vision, config.data.resolution
        if preprocessor:
            apply_normalisation(v, preprocessor)
        patches = int((preprocessor or {}).get("max_num_patches", hf_vision.num_patches))
        unit = v.patch_size * v.spatial_merge_size
        r.mode, r.min_pixels, r.max_pixels = "native", unit * unit, patches * v.patch_size ** 2
        if patches < v.spatial_merge_size ** 2:
            problems.append(f"preprocessor_config.json max_num_patches = {patches}: fewer than one "
                            f"{v.spatial_merge_size} x {v.spatial_merge_size} block of patches")

    @torch.no_grad()
    def reference_features(self, model, image: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
        c, height, width = image.shape
        p = vision.patch_size
        rows, cols = height // p, width // p
        # SigLIP2's processor flattens each patch channel-last.
        patches = image.reshape(c, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(1, rows * cols, p * p * c)
        out = model(pixel_values=patches, pixel_attention_mask=torch.ones(1, rows * cols, dtype=torch.long),
                    spatial_shapes=torch.tensor([[rows, cols]]), output_hidden_states=True)
        if vision.post_norm:
            return out.last_hidden_state[0].float()
        return out.hidden_states[vision.num_layers][0].float()


VISION_SIDES = {
    side.vision_model_type: side
    for side in (
        VisionSide("siglip", "siglip_vision_model", "siglip", "SiglipVisionConfig", "SiglipVisionModel", -1),
        VisionSide("clip", "clip_vision_model", "clip", "CLIPVisionConfig", "CLIPVisionModel", -2),
        Siglip2VisionSide("siglip2", "siglip2_vision_model", "siglip2", "Siglip2VisionConfig", "Siglip2VisionModel",
                          -1),
        *_qwen_sides(),
    )
}


def vision_side_for(data: dict, where: str) -> VisionSide:
    model_type = data.get("model_type")
    for side in VISION_SIDES.values():
        if model_type in (side.vision_model_type, side.full_model_type):
            return side
    valid = sorted(t for s in VISION_SIDES.values() for t in (s.vision_model_type, s.full_model_type))
    raise ConversionError(
        f"{where}: model_type = {model_type!r} is not a vision tower a composed import reads "
        f"(valid: {', '.join(valid)})"
    )


# ---------------------------------------------------------------------------
# Language models
# ---------------------------------------------------------------------------


def _no_biases(hf, problems: list[str], *fields: str) -> None:
    for name in fields:
        if getattr(hf, name, False):
            problems.append(f"{name} = true: megavl's LM has no biases there (valid: false)")


def _qwen2(hf, problems: list[str]) -> dict:
    return dict(qkv_bias=True, qk_layernorm=False, rope=qwen_lm.check_text_config(hf, "", ("default",), problems))


def _qwen3(hf, problems: list[str]) -> dict:
    _no_biases(hf, problems, "attention_bias")
    return dict(qkv_bias=False, qk_layernorm=True, rope=qwen_lm.check_text_config(hf, "", ("default",), problems))


def _llama(hf, problems: list[str]) -> dict:
    _no_biases(hf, problems, "attention_bias", "mlp_bias")
    if getattr(hf, "pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp = {hf.pretraining_tp}: megavl reproduces pretraining_tp = 1 only")
    # Llama 3 and SmolLM2 use default RoPE, Llama 3.1+ "llama3" frequency scaling.
    return dict(qkv_bias=False, qk_layernorm=False,
                rope=qwen_lm.check_text_config(hf, "", ("default", "llama3"), problems))


@dataclass(frozen=True)
class LMSide:
    architecture: str  # config.json's "architectures" name
    model_type: str
    config_class: str
    fields: Any  # (hf config, problems) -> the LMConfig fields of this family

    def lm_config(self, hf, problems: list[str]) -> LMConfig:
        """The LM megavl builds for hf (its image token id is set by the import)."""
        if self.model_type == qwen3_moe.MODEL_TYPE:
            # The MoE translation checks the image token against the vocabulary; the composed
            # import adds its own tokens, so id 0 stands in until then.
            return qwen3_moe.lm_config(hf, 0, problems)
        family = self.fields(hf, problems)
        rope = family.pop("rope")
        return dataclasses.replace(
            LMConfig(),
            **qwen_lm.lm_fields_from_hf(hf, rope, bool(hf.tie_word_embeddings), image_token_id=0),
            **family,
            rope="1d",
        )

    def hf_config(self, data: dict, where: str):
        import transformers

        try:
            return getattr(transformers, self.config_class).from_dict(data)
        except Exception as e:  # transformers' own validation, whatever it raises
            raise ConversionError(f"{where}: transformers rejects it: {e}") from e

    def load_reference(self, folder: str):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True).eval()


LM_SIDES = {
    side.architecture: side
    for side in (
        LMSide("Qwen2ForCausalLM", "qwen2", "Qwen2Config", _qwen2),
        LMSide("Qwen3ForCausalLM", "qwen3", "Qwen3Config", _qwen3),
        LMSide("LlamaForCausalLM", "llama", "LlamaConfig", _llama),
        LMSide(qwen3_moe.NAME, qwen3_moe.MODEL_TYPE, "Qwen3MoeConfig", None),
    )
}


def lm_side_for(data: dict, where: str) -> LMSide:
    found = data.get("architectures") or []
    for name in [found] if isinstance(found, str) else found:
        if name in LM_SIDES:
            return LM_SIDES[name]
    raise ConversionError(
        f"{where}: architectures = {found} is not a text language model a composed import reads "
        f"(valid: {', '.join(LM_SIDES)})"
    )
