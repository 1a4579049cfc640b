"""Checks a Qwen3-MoE + Qwen2.5-VL-vision conversion part by part.

No Hugging Face model holds the pair, so each part is compared with the
model it came from: the LM's logits on a text-only input with
Qwen3MoeForCausalLM's, and the vision tower + adapter's image embeddings with
the Qwen2.5-VL model's visual module (its patch merger's output). Models run
one after the other in fp32, so only one is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megavl.config import Config
from megavl.convert.verify import (
    DEFAULT_TOLERANCE,
    load_megavl_for_verification,
    megavl_logits,
    random_text,
    verification_images,
)
from megavl.data.batch import Sample, collate_rows, pack_row
from megavl.models.inputs import IGNORE_INDEX

TEXT_TOKENS = 24


@dataclass
class PairVerifyResult:
    text_max_abs_diff: float
    # None when only the language model was compared (an LM-only export).
    vision_max_abs_diff: Optional[float]
    tolerance: float
    tokens: int
    image_grids: list

    @property
    def ok(self) -> bool:
        diffs = [self.text_max_abs_diff] + ([] if self.vision_max_abs_diff is None else [self.vision_max_abs_diff])
        return all(d <= self.tolerance for d in diffs)

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        text = f"LM: max |logit diff| = {self.text_max_abs_diff:.3e} on {self.tokens} text tokens"
        vision = (
            "" if self.vision_max_abs_diff is None
            else f"; vision tower + adapter: max |embedding diff| = {self.vision_max_abs_diff:.3e} "
                 f"on images {self.image_grids} (t,h,w patches)"
        )
        return f"verification {verdict}: {text}{vision} (tolerance {self.tolerance:.0e})"


def text_batch(config: Config, reserved: Iterable[int] = ()) -> dict:
    """One row of random text tokens (no special tokens), as megavl's loader collates it."""
    lm = config.model.lm
    tokens = random_text(config, reserved)(TEXT_TOKENS)
    n = len(tokens)
    sample = Sample(tokens=tokens, labels=[IGNORE_INDEX] * n, turn_ids=[0] * n, images=[], key="verify")
    return collate_rows([pack_row([sample], n, lm.image_token_id, config.model.vision.spatial_merge_size)])


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
    """The megavl checkpoint's LM against Qwen3MoeForCausalLM in lm_dir and (vision_dir
    given) its vision tower + adapter against the Qwen2.5-VL model there."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3MoeForCausalLM

    from megavl.convert.megavl_model import single_process_config

    fp32 = single_process_config(config, dtype="fp32")
    batch = text_batch(fp32, reserved)
    model = load_megavl_for_verification(fp32, megavl_dir)
    ours_text = megavl_logits(model, fp32, batch)
    pixels, grids = image_inputs(fp32)
    ours_images = megavl_image_embeddings(model, pixels, grids) if vision_dir else None
    del model
    gc.collect()

    lm = Qwen3MoeForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, local_files_only=True)
    text_diff = _max_diff(ours_text, hf_text_logits(lm, batch), "logit")
    del lm
    gc.collect()
    vision_diff = None
    if vision_dir:
        vl = Qwen2_5_VLForConditionalGeneration.from_pretrained(vision_dir, dtype=torch.float32, local_files_only=True)
        vision_diff = _max_diff(ours_images, hf_image_embeddings(vl, pixels, grids), "image embedding")
        del vl
        gc.collect()
    return PairVerifyResult(
        text_max_abs_diff=text_diff,
        vision_max_abs_diff=vision_diff,
        tolerance=tolerance,
        tokens=int(batch["tokens"].numel()),
        image_grids=grids.tolist() if vision_dir else [],
    )

