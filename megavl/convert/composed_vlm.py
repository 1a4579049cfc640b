"""What Hugging Face's composed-VLM classes (LLaVA, Idefics3) share as export targets: a SigLIP or
CLIP tower on fixed-size images, a projector, and a dense text LM of any family transformers builds
from a text_config (Qwen2 / Qwen2.5, Qwen3, Llama / SmolLM2), numbering image tokens like text and
attending to them causally.

Each class (megavl.convert.llava, megavl.convert.idefics3) describes its tower's reading, its
projector and its tensor prefixes; the LM's config, its checks and the logit verification are here.
Verification runs megavl's packed rows against the Hugging Face model on each document alone, with
images made at the tower's size (both models see the same pixels, so preprocessing plays no part).
"""

from __future__ import annotations

import abc
import gc
from typing import Iterable, Optional, Sequence

import torch

from megavl.config import Config
from megavl.convert import qwen_lm
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.mapping import Mapping, MappingTable, rehomed
from megavl.convert.vision_towers import tower_mappings
from megavl.convert.verify import (
    DEFAULT_TOLERANCE, ONE_DOCUMENT, PACKED_PADDING, PACKED_ROW, VerificationInput, VerifyResult, compare, document,
    load_megavl_for_verification, megavl_logits, random_text,
)

# (model.lm.qkv_bias, qk_layernorm) of a dense megavl LM -> the text model_type that has them.
TEXT_FAMILIES = {(True, False): "qwen2", (False, True): "qwen3", (False, False): "llama"}

# The text LM's tensors in a causal-LM checkpoint (qwen_lm's names): embeddings, layers and norm
# under "model.", the output layer as "lm_head.weight".
_LM_BODY, _LM_HEAD = "model.", "lm_head."


def text_model_type(config: Config) -> Optional[str]:
    lm = config.model.lm
    return TEXT_FAMILIES.get((lm.qkv_bias, lm.qk_layernorm))


def text_config(config: Config) -> dict:
    """The text_config of config's LM: a Qwen2, Qwen3 or Llama config by its biases and q/k norms."""
    lm = config.model.lm
    model_type = text_model_type(config)
    fields = qwen_lm.lm_fields_to_hf(lm, mrope=False)
    fields.update(model_type=model_type, tie_word_embeddings=lm.tie_embeddings)
    if model_type == "llama":
        del fields["use_sliding_window"]
        fields.update(attention_bias=False, mlp_bias=False)
    return fields


def lm_problems(config: Config, architecture: str) -> list[str]:
    """Why architecture's text LM (any dense family of TEXT_FAMILIES with 1-D RoPE, image tokens
    numbered like text and attended causally) cannot reproduce config's."""
    lm, problems = config.model.lm, []
    if lm.rope != "1d":
        problems.append(f"model.lm.rope = {lm.rope}: {architecture}'s text LM has 1-D RoPE (1d)")
    if lm.image_positions != "sequential":
        problems.append(
            f"model.lm.image_positions = {lm.image_positions}: {architecture} numbers image tokens like text "
            "(sequential)"
        )
    if lm.image_attention != "causal":
        problems.append(
            f"model.lm.image_attention = {lm.image_attention}: {architecture} attends causally over image tokens, "
            "so it would compute different outputs (valid: causal)"
        )
    lora = lm.vision_lora
    if lora.enabled and (lora.mlp_rank or lora.attn_rank):
        problems.append(
            f"model.lm.vision_lora: mlp_rank = {lora.mlp_rank}, attn_rank = {lora.attn_rank}, enabled: "
            f"{architecture} has no vision-only LoRA adapters (a model whose adapters are disabled, "
            "enabled: false, is exported without them)"
        )
    if lm.moe.num_experts:
        problems.append(f"model.lm.moe.num_experts = {lm.moe.num_experts}: {architecture} is exported with a "
                        "dense LM")
    if text_model_type(config) is None:
        problems.append(
            "model.lm.qkv_bias = true with qk_layernorm = true: no Hugging Face text LM has both "
            "(Qwen2: biases; Qwen3: q/k norms; Llama: neither)"
        )
    return problems


def fixed_image_side(config: Config) -> Optional[int]:
    """The side in pixels of every image the model sees (fixed squares, or tiles), None when
    images are not all one square (native resolution, a fixed grid that is not square)."""
    from megavl.data.resolution import fixed_grid

    v, r = config.model.vision, config.data.resolution
    if r.mode == "fixed":
        rows, cols = fixed_grid(r.fixed_tokens)
        return rows * v.patch_size * v.spatial_merge_size if rows == cols else None
    if r.mode == "tiling":
        return r.tile_size
    return None


def image_problems(config: Config, architecture: str, kinds: Sequence[str], modes: Sequence[str]) -> list[str]:
    """Why config's tower or its images are not architecture's: a tower of `kinds`, fed squares of
    its pretrained patch grid in one of the resolution `modes` (the Hugging Face tower does not
    interpolate its position table)."""
    v, r = config.model.vision, config.data.resolution
    problems = []
    if v.kind not in kinds:
        problems.append(f"model.vision.kind = {v.kind}: {architecture}'s tower is {' or '.join(kinds)}")
        return problems
    if r.mode not in modes:
        problems.append(
            f"data.resolution.mode = {r.mode}: {architecture} takes images of one size, squares of the "
            f"tower's position table (valid: {', '.join(modes)})"
        )
        return problems
    side = fixed_image_side(config)
    if side is None:
        problems.append(f"data.resolution.fixed_tokens = {r.fixed_tokens}: not a square number, so the images are "
                        f"not squares, which {architecture} takes")
        return problems
    grid = v.image_size // v.patch_size  # the tower's convolution drops a remainder of pixels
    if side % v.patch_size or side // v.patch_size != grid:
        what = (f"fixed_tokens = {r.fixed_tokens} ({side} px squares)" if r.mode == "fixed"
                else f"tile_size = {r.tile_size}")
        problems.append(
            f"data.resolution.{what}: {architecture}'s tower takes squares of {grid} x {grid} patches "
            f"({grid * v.patch_size} px), the size of its position table (model.vision.image_size = {v.image_size})"
        )
    return problems


def lm_mappings(config: Config, body: str, head: str) -> list[Mapping]:
    """The LM's mappings with its tensors stored under body (its layers, embeddings and norm) and
    head (the output layer), e.g. LLaVA's ``language_model.model.`` and ``language_model.lm_head.``."""
    mappings = rehomed(qwen_lm.lm_mappings(config), _LM_BODY, body)
    return rehomed(mappings, _LM_HEAD, head)


class ComposedVLMArchitecture(Architecture):
    """A Hugging Face class composing a SigLIP / CLIP tower, a projector and a text LM."""

    #: Where the tower, the LM's body and its output layer are stored.
    tower_prefix = ""
    lm_body_prefix = ""
    lm_head_prefix = ""
    #: The tower kinds and resolution modes the class reproduces.
    tower_kinds: tuple[str, ...] = ()
    resolution_modes: tuple[str, ...] = ("fixed",)

    def tower_problems(self, config: Config) -> list[str]:
        """Why the class cannot read config's tower and projector (beyond image_problems)."""
        return []

    @abc.abstractmethod
    def adapter_mappings(self, config: Config) -> list[Mapping]:
        """The projector's mappings, in the class's names."""

    def export_problems(self, config: Config) -> list[str]:
        problems = image_problems(config, self.name, self.tower_kinds, self.resolution_modes)
        if not problems:
            problems += self.tower_problems(config)
        return problems + lm_problems(config, self.name)

    def megavl_config(self, hf_configs, preprocessor):
        raise ConversionError(
            f"{self.name} folders are not imported: compose the same model from its parts "
            "(tools/convert_from_hf.py --vision TOWER --lm LM --adapter KIND)"
        )

    def table(self, config: Config) -> MappingTable:
        return MappingTable(
            tower_mappings(config.model.vision, self.tower_prefix)
            + self.adapter_mappings(config)
            + lm_mappings(config, self.lm_body_prefix, self.lm_head_prefix),
        )

    # -- verification ------------------------------------------------------

    @abc.abstractmethod
    def hf_forward(self, hf_model, input_ids: torch.Tensor, pictures: list[torch.Tensor]) -> torch.Tensor:
        """[1, tokens, vocab] logits of the Hugging Face model on one document and its [3, S, S] images."""

    def verify(self, hf_dirs: Sequence[str], config: Config, megavl_dir: str, reserved: Iterable[int],
               tolerance: float = DEFAULT_TOLERANCE) -> VerifyResult:
        return verify_fixed_images(self, hf_dirs[0], config, megavl_dir, reserved, tolerance)


def verification_pictures(config: Config, count: int = 3) -> list[torch.Tensor]:
    """count fixed random [3, S, S] images (already normalised) at the size every image of the model
    has."""
    side = fixed_image_side(config)
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(3, side, side, generator=generator) for _ in range(count)]


def verification_documents(config: Config, reserved: Iterable[int]) -> list[tuple[VerificationInput, list]]:
    """(input, each document's pictures): one document with two images, and a packed row of three
    documents (two images, text only, one image) with trailing padding, as verify.verification_inputs
    but with images of the model's one size. In the layouts an int is that many text tokens, a
    letter one of the pictures."""
    from megavl.data.batch import ImagePatches
    from megavl.data.image_patches import image_to_patches

    v = config.model.vision
    pictures = dict(zip("abc", verification_pictures(config)))
    patches = {k: ImagePatches(*image_to_patches(p, v.patch_size, v.temporal_patch_size, v.spatial_merge_size))
               for k, p in pictures.items()}
    layouts = [
        (ONE_DOCUMENT, [[5, "a", 3, "b", 6]], 0),
        (PACKED_ROW, [[4, "b", 3, "c", 2], [7], ["a", 6]], PACKED_PADDING),
    ]
    out = []
    for name, documents, padding in layouts:
        text = random_text(config, reserved)
        samples = [document(config, [patches.get(part, part) for part in parts], text, f"verify-{i}")
                   for i, parts in enumerate(documents)]
        images = [[pictures[part] for part in parts if isinstance(part, str)] for parts in documents]
        out.append((VerificationInput(name, samples, padding=padding), images))
    return out


@torch.no_grad()
def verify_fixed_images(architecture: ComposedVLMArchitecture, hf_dir: str, config: Config, megavl_dir: str,
                        reserved: Iterable[int], tolerance: float = DEFAULT_TOLERANCE) -> VerifyResult:
    """Logits of the megavl checkpoint against the Hugging Face folder, both in fp32, on
    verification_documents; positions compared with the text LM's 0, 1, ... of each document."""
    from megavl.convert.megavl_model import single_process_config

    fp32 = single_process_config(config, dtype="fp32")
    inputs = verification_documents(fp32, reserved)
    batches = [verification_input.batch(fp32) for verification_input, _ in inputs]
    model = load_megavl_for_verification(fp32, megavl_dir)
    ours = [megavl_logits(model, fp32, batch) for batch in batches]
    del model
    gc.collect()

    hf_model = architecture.model_class().from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True).eval()
    checks = []
    for (verification_input, pictures), batch, logits in zip(inputs, batches, ours):
        theirs = [architecture.hf_forward(hf_model, doc["tokens"], images)
                  for doc, images in zip(verification_input.document_batches(fp32), pictures)]
        positions = batch["position_ids"]
        counting = [torch.arange(len(d)).expand(positions.shape[0], 1, len(d)) for d in verification_input.documents]
        checks.append(compare(verification_input, logits, [t.float() for t in theirs], tolerance, positions,
                              counting, positions_compared=("positions", "the text LM's 0, 1, ...")))
    del hf_model
    gc.collect()
    return VerifyResult(inputs=checks, tolerance=tolerance)
