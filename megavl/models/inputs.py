"""What the model eats: the microbatch contract and the one forward call.

The data pipeline (megavl/data/batch.py) writes microbatches in this form; the
trainer, the evaluation and the converters' logit checks all feed them to the
model through ``forward`` here, so there is one place that says which keys a
microbatch has, what the sentinel ids mean and how the attention mask is made.
"""

from __future__ import annotations

from typing import Optional, TypedDict

import torch

from megavl.attention.mask import PAD_DOCUMENT_ID, TEXT_IMAGE_ID, check_id_values, materialize, vlm_mask_mod
from megavl.config import Config

# Label of a position that takes no loss (PyTorch's cross-entropy convention).
IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "PAD_DOCUMENT_ID",
    "TEXT_IMAGE_ID",
    "Microbatch",
    "attention_mask_for",
    "check_image_tokens",
    "forward",
    "to_device",
]


class Microbatch(TypedDict):
    """One microbatch of packed rows, b rows of s tokens (megavl/data/batch.py collate_rows)."""

    tokens: torch.Tensor  # [b, s] token ids; padding uses the pad token
    labels: torch.Tensor  # [b, s] next-token ids, clamped to valid ids (loss_mask says which count)
    loss_mask: torch.Tensor  # [b, s] bool: positions whose loss is taken
    document_ids: torch.Tensor  # [b, s] packed document of each token, PAD_DOCUMENT_ID for padding
    image_ids: torch.Tensor  # [b, s] image of each image token, TEXT_IMAGE_ID for text
    turn_ids: torch.Tensor  # [b, s] conversation turn (conversation masking)
    position_ids: torch.Tensor  # [3, b, s] multimodal RoPE positions (t, h, w)
    pixel_values: Optional[torch.Tensor]  # [patches, C*T*P*P] of all images in token order, or None
    image_grid_thw: Optional[torch.Tensor]  # [images, 3] patch grid of each image, or None; stays on the host


# Read on the host only (patch coordinates, window ids, position-table sizes are computed from it):
# left there, it costs neither a copy to the device nor a sync back for each use.
HOST_FIELDS = frozenset({"image_grid_thw"})


def check_image_tokens(tokens: torch.Tensor, image_grid_thw: Optional[torch.Tensor], image_token_id: int,
                       merge: int) -> None:
    """ValueError unless the image-pad tokens are as many as the images' merged patches.

    Checked before the vision tower runs: a mismatch would otherwise cost a whole ViT pass.
    """
    slots = int((tokens == image_token_id).sum())
    has_images = image_grid_thw is not None and len(image_grid_thw) > 0
    expected = int(image_grid_thw.prod(dim=-1).sum()) // (merge * merge) if has_images else 0
    if slots != expected:
        raise ValueError(
            f"the batch has {slots} image-pad tokens (id {image_token_id}) but "
            + (f"its images give {expected} embeddings (grid_thw={image_grid_thw.tolist()}); "
               "each image needs t*h*w/merge^2 pad tokens" if has_images else "no images")
        )


def to_device(batch: Microbatch, config: Config, device: torch.device) -> Microbatch:
    """Moves a microbatch to the device (all but HOST_FIELDS) and shapes position ids for the configured RoPE.

    The checks that read values (ids against their sentinels, image-pad tokens against the
    images) run here on the host copies when the batch moves to an accelerator, so that the
    forward reads none back; on the CPU the mask and the model run them (once).
    """
    if device.type != "cpu" and batch["tokens"].device.type == "cpu":
        check_id_values(batch["document_ids"], batch["image_ids"], batch["turn_ids"])
        check_image_tokens(batch["tokens"], batch["image_grid_thw"], config.model.lm.image_token_id,
                           config.model.vision.spatial_merge_size)
    moved = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in HOST_FIELDS else v)
             for k, v in batch.items()}
    if config.model.lm.rope == "1d":
        # 1D RoPE takes one position per token; the three mrope components are equal for text.
        moved["position_ids"] = moved["position_ids"][0]
    return moved


def attention_mask_for(batch: Microbatch, bidirectional_images: bool, backend: str):
    """The attention mask of a microbatch in the form the attention back end takes."""
    mask_mod = vlm_mask_mod(batch["document_ids"], batch["image_ids"], batch["turn_ids"], bidirectional_images)
    b, s = batch["tokens"].shape
    return materialize(mask_mod, b, s, backend)


def forward(model, batch: Microbatch, config: Config, platform, with_labels: bool = True,
            gather_logits: bool = False) -> torch.Tensor:
    """Runs the model on a microbatch already on the device.

    With labels: per-token loss [b, s] on the last pipeline stage; without: logits
    (gathered over tensor-parallel ranks when asked) or, before the last stage, hidden states.
    """
    bidirectional = config.model.lm.image_attention == "bidirectional"
    mask = attention_mask_for(batch, bidirectional, platform.attention_backend)
    return model(
        batch["tokens"],
        batch["position_ids"],
        mask,
        labels=batch["labels"] if with_labels else None,
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        gather_logits=gather_logits,
    )
