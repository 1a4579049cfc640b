"""Checks a conversion by comparing logits of the Hugging Face and megavl models.

One text+image input is built with megavl's own pipeline (images through
image_to_model_input, tokens packed by pack_row, the attention mask the
training step uses). The Hugging Face model gets the same token ids, pixel
values and image grids and computes its own multimodal RoPE positions, which
are compared with megavl's too. The two models run one after the other, so
only one is in memory at a time.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
from PIL import Image

from megavl.config import Config
from megavl.data.batch import Sample, collate_rows, pack_row
from megavl.data.images import image_to_model_input
from megavl.models.inputs import IGNORE_INDEX

DEFAULT_TOLERANCE = 1e-4
# Models below this size are verified unless the user says otherwise.
AUTO_VERIFY_MAX_PARAMS = 2_000_000_000


def wants_verification(verify: Optional[bool], num_parameters: int) -> bool:
    """verify=None (the default) verifies models below AUTO_VERIFY_MAX_PARAMS, which load
    twice over quickly; larger ones only when asked."""
    return num_parameters < AUTO_VERIFY_MAX_PARAMS if verify is None else verify


@dataclass
class VerifyResult:
    max_abs_diff: float
    # max_abs_diff relative to the largest |logit| of the Hugging Face model.
    max_rel_diff: float
    tolerance: float
    tokens: int
    image_grids: list
    position_mismatches: int

    @property
    def ok(self) -> bool:
        return self.position_mismatches == 0 and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        positions = (
            "mrope positions match get_rope_index"
            if self.position_mismatches == 0
            else f"mrope positions differ from get_rope_index at {self.position_mismatches} entries"
        )
        return (
            f"verification {verdict}: {self.tokens} tokens with images {self.image_grids} (t,h,w patches); "
            f"max |logit diff| = {self.max_abs_diff:.3e} (tolerance {self.tolerance:.0e}), "
            f"relative to max |logit| = {self.max_rel_diff:.3e}; {positions}"
        )


def reserved_token_ids(hf_config: dict) -> set[int]:
    """Special-token ids of a config.json (image, video, vision start/end, ...)."""
    return {v for k, v in hf_config.items() if k.endswith("_token_id") and isinstance(v, int)}


def verification_images(config: Config) -> list[Image.Image]:
    """Two fixed random images: one spanning several attention windows, one small and not square."""
    v = config.model.vision
    unit = v.patch_size * v.spatial_merge_size
    sizes = [(v.window_size + unit, 2 * v.window_size), (2 * unit, 3 * unit)]  # (height, width)
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def random_text(config: Config, reserved: Iterable[int] = ()):
    """text(n): n random token ids, never a special token (reserved, the image token),
    the same sequence on every call of random_text."""
    lm = config.model.lm
    excluded = set(reserved) | {lm.image_token_id}
    allowed = torch.tensor([i for i in range(lm.vocab_size) if i not in excluded])
    generator = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()

    return text


def verification_batch(config: Config, reserved: Iterable[int] = ()) -> dict:
    """Text, image, text, image, text as one packed row (no padding)."""
    lm = config.model.lm
    merge = config.model.vision.spatial_merge_size
    images = [image_to_model_input(image, config) for image in verification_images(config)]
    text = random_text(config, reserved)

    def pads(image) -> list[int]:
        return [lm.image_token_id] * image.num_tokens(merge)

    tokens = text(5) + pads(images[0]) + text(3) + pads(images[1]) + text(6)
    n = len(tokens)
    sample = Sample(tokens=tokens, labels=[IGNORE_INDEX] * n, turn_ids=[0] * n, images=images, key="verify")
    return collate_rows([pack_row([sample], n, lm.image_token_id, merge)])


@torch.no_grad()
def megavl_logits(model, config: Config, batch: dict) -> torch.Tensor:
    """[batch, seq, vocab] logits, gathered over tensor-parallel ranks (last pipeline stage only)."""
    from megavl.models import inputs as model_inputs
    from megavl.platform.features import detect

    platform = detect()
    model.eval()
    logits = model_inputs.forward(model, model_inputs.to_device(batch, config, platform.device), config, platform,
                                  with_labels=False, gather_logits=True)
    return logits.float().cpu()


@torch.no_grad()
def hf_logits_and_positions(hf_model, batch: dict, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face model's logits and the mrope positions it computes for the batch."""
    input_ids = batch["tokens"]
    # Marks image tokens; without it transformers falls back to 1D positions.
    mm_token_type_ids = (input_ids == image_token_id).int()
    positions, _ = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=batch["image_grid_thw"]
    )
    hf_model.eval()
    out = hf_model(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        mm_token_type_ids=mm_token_type_ids,
    )
    return out.logits.float(), positions


def compare(megavl: torch.Tensor, hf: torch.Tensor, megavl_positions: torch.Tensor,
            hf_positions: torch.Tensor, batch: dict, tolerance: float) -> VerifyResult:
    if megavl.shape != hf.shape:
        raise ValueError(f"logit shapes differ: megavl {tuple(megavl.shape)}, Hugging Face {tuple(hf.shape)}")
    diff = (megavl - hf).abs().max().item()
    scale = hf.abs().max().item()
    return VerifyResult(
        max_abs_diff=diff,
        max_rel_diff=diff / scale if scale > 0 else float("inf"),
        tolerance=tolerance,
        tokens=int(batch["tokens"].numel()),
        image_grids=batch["image_grid_thw"].tolist(),
        position_mismatches=int((megavl_positions.cpu() != hf_positions.cpu()).sum()),
    )


def load_megavl_for_verification(config: Config, megavl_dir: str):
    """The whole megavl model with the weights of megavl_dir."""
    from megavl.convert.megavl_model import build_single_process_model
    from megavl.training.checkpoint import load_model_weights

    model = build_single_process_model(config)
    # A tensor the checkpoint failed to restore would stay NaN and show in the outputs.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    load_model_weights(model, megavl_dir)
    return model


def verify_conversion(
    hf_dir: str,
    config: Config,
    architecture,
    megavl_dir: str,
    reserved: Iterable[int] = (),
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyResult:
    """Logits of the megavl checkpoint in megavl_dir against the Hugging Face model in
    hf_dir, both in fp32, on verification_batch."""
    from megavl.convert.megavl_model import single_process_config

    fp32 = single_process_config(config, dtype="fp32")
    batch = verification_batch(fp32, reserved)
    megavl_model = load_megavl_for_verification(fp32, megavl_dir)
    ours = megavl_logits(megavl_model, fp32, batch)
    del megavl_model
    gc.collect()

    hf_model = architecture.model_class().from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    theirs, hf_positions = hf_logits_and_positions(hf_model, batch, config.model.lm.image_token_id)
    del hf_model
    gc.collect()
    return compare(ours, theirs, batch["position_ids"], hf_positions, batch, tolerance)
