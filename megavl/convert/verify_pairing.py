"""Checks a Qwen3-MoE + Qwen2.5-VL-vision conversion part by part.

No Hugging Face model holds the pair, so each part is compared with the
model it came from: the LM's logits with Qwen3MoeForCausalLM's on two
text-only inputs, one document and a packed row of three documents with
trailing padding (each document run through Qwen3MoeForCausalLM alone, its
logits compared at its place in the row, padding not compared); and the vision
tower + adapter's image embeddings with the Qwen2.5-VL model's visual module
(its patch merger's output). Models run one after the other in fp32, so only
one is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megavl.config import Config
from megavl.convert.verify import (
    DEFAULT_TOLERANCE,
    ONE_DOCUMENT,
    PACKED_PADDING,
    PACKED_ROW,
    InputCheck,
    VerificationInput,
    compare,
    document,
    find_input,
    largest,
    load_megavl_for_verification,
    megavl_logits,
    random_text,
    verification_images,
)

TEXT_TOKENS = 24
# Token counts of the packed text row's documents (before its PACKED_PADDING).
PACKED_TEXT_TOKENS = (9, 6, 11)
# The LM takes no position ids from the input: its positions are 0, 1, ... per call.
HF_TEXT_POSITIONS = ("positions", "Qwen3MoeForCausalLM's 0, 1, ...")


@dataclass
class PairVerifyResult:
    # The LM's checks, one per text input.
    text: list[InputCheck]
    # None when only the language model was compared (an LM-only export).
    vision_max_abs_diff: Optional[float]
    tolerance: float
    image_grids: list
    # What the image check compared: the tower and adapter (a pairing), or the tower alone (a composed
    # import, whose projector is new).
    vision_label: str = "vision tower + adapter"

    def input(self, name: str) -> InputCheck:
        return find_input(self.text, name)

    @property
    def text_max_abs_diff(self) -> float:
        return largest(check.max_abs_diff for check in self.text)

    @property
    def vision_ok(self) -> bool:
        return self.vision_max_abs_diff is None or self.vision_max_abs_diff <= self.tolerance

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.text) and self.vision_ok

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"verification {verdict} (tolerance {self.tolerance:.0e}):"]
        lines += [f"  {check.describe(label='LM, ')}" for check in self.text]
        if self.vision_max_abs_diff is not None:
            lines.append(
                f"  {self.vision_label} {'OK' if self.vision_ok else 'FAILED'}: max |embedding diff| = "
                f"{self.vision_max_abs_diff:.3e} on images {self.image_grids} (t,h,w patches)"
            )
        return "\n".join(lines)


def text_inputs(config: Config, reserved: Iterable[int] = ()) -> list[VerificationInput]:
    """One document of random text tokens (no special tokens), and a packed row of three
    such documents with trailing padding."""
    single = VerificationInput(ONE_DOCUMENT, [document(config, [TEXT_TOKENS], random_text(config, reserved), "verify")])
    text = random_text(config, reserved)
    packed = VerificationInput(
        PACKED_ROW, [document(config, [n], text, f"verify-{i}") for i, n in enumerate(PACKED_TEXT_TOKENS)],
        padding=PACKED_PADDING,
    )
    return [single, packed]


def text_batch(config: Config, reserved: Iterable[int] = ()) -> dict:
    """The one-document text input as megavl's loader collates it."""
    return text_inputs(config, reserved)[0].batch(config)


def image_inputs(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) of verification_images, through megavl's image pipeline."""
    from megavl.data.images import image_to_model_input

    images = [image_to_model_input(image, config) for image in verification_images(config)]
    return torch.cat([im.pixel_values for im in images]), torch.tensor([list(im.grid_thw) for im in images])


@torch.no_grad()
def megavl_image_embeddings(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    return model.adapter(model.vision(pixel_values, grid_thw)).float()


@torch.no_grad()
def hf_text_logits(hf_model, batch: dict) -> torch.Tensor:
    hf_model.eval()
    tokens = batch["tokens"]
    return hf_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits.float()


@torch.no_grad()
def hf_image_embeddings(hf_vl_model, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    hf_vl_model.eval()
    return hf_vl_model.model.visual(pixel_values, grid_thw=grid_thw).pooler_output.float()


def check_text(hf_lm, inputs: list[VerificationInput], rows: list[dict], ours: list[torch.Tensor], config: Config,
               tolerance: float, positions_compared: tuple[str, str],
               columns: Optional[int] = None) -> list[InputCheck]:
    """megavl's logits `ours` on each packed text input (`rows`) against the Hugging Face causal LM's on
    each of its documents alone; columns: compare the logits of the first `columns` token ids only."""
    checks = []
    for text_input, row, logits in zip(inputs, rows, ours):
        batches = text_input.document_batches(config)
        # Given no position ids, the LM numbers each input 0, 1, ... (1D RoPE); megavl's row must
        # restart so at every document. RoPE is relative, so the logits of isolated documents
        # would not show a row that numbered on across them.
        hf_positions = [torch.arange(b["tokens"].shape[1]).view(1, 1, -1) for b in batches]
        theirs = [hf_text_logits(hf_lm, b)[..., :columns] for b in batches]
        checks.append(compare(text_input, logits[..., :columns], theirs, tolerance, row["position_ids"][:1],
                              hf_positions, positions_compared))
    return checks


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    if ours.shape != theirs.shape:
        raise ValueError(f"{what} shapes differ: megavl {tuple(ours.shape)}, Hugging Face {tuple(theirs.shape)}")
    return (ours - theirs).abs().max().item()


def verify_pairing(
    lm_dir: str,
    vision_dir: Optional[str],
    config: Config,
    megavl_dir: str,
    reserved: Iterable[int] = (),
    tolerance: float = DEFAULT_TOLERANCE,
) -> PairVerifyResult:
    """The megavl checkpoint's LM against Qwen3MoeForCausalLM in lm_dir on text_inputs and
    (vision_dir given) its vision tower + adapter against the Qwen2.5-VL model there."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3MoeForCausalLM

    from megavl.convert.megavl_model import single_process_config

    fp32 = single_process_config(config, dtype="fp32")
    inputs = text_inputs(fp32, reserved)
    rows = [text_input.batch(fp32) for text_input in inputs]
    model = load_megavl_for_verification(fp32, megavl_dir)
    ours_text = [megavl_logits(model, fp32, row) for row in rows]
    pixels, grids = image_inputs(fp32)
    ours_images = megavl_image_embeddings(model, pixels, grids) if vision_dir else None
    del model
    gc.collect()

    lm = Qwen3MoeForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, local_files_only=True)
    text_checks = check_text(lm, inputs, rows, ours_text, fp32, tolerance, HF_TEXT_POSITIONS)
    del lm
    gc.collect()
    vision_diff = None
    if vision_dir:
        vl = Qwen2_5_VLForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32, local_files_only=True)
        vision_diff = _max_diff(ours_images, hf_image_embeddings(vl, pixels, grids), "image embedding")
        del vl
        gc.collect()
    return PairVerifyResult(
        text=text_checks,
        vision_max_abs_diff=vision_diff,
        tolerance=tolerance,
        image_grids=grids.tolist() if vision_dir else [],
    )
