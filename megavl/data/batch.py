"""Tokenised samples -> packed rows -> the batch dict the model's forward step takes.

A *sample* is one example (document): tokens, next-token labels (-100 where
no loss is taken), conversation turn ids, and its images as patches. A *row*
is several samples packed into ``seq_length`` tokens, padded at the end. A
*batch* stacks rows and concatenates their images in token order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from megavl.models.inputs import IGNORE_INDEX, Microbatch, PAD_DOCUMENT_ID, TEXT_IMAGE_ID

__all__ = ["IGNORE_INDEX", "ImagePatches", "Sample", "collate_rows", "mrope_position_ids", "pack_row",
           "sequential_position_ids"]


@dataclass
class ImagePatches:
    pixel_values: torch.Tensor  # [t*h*w, C*T*P*P]
    grid_thw: tuple[int, int, int]  # in patches

    def num_tokens(self, merge: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge * merge)


@dataclass
class Sample:
    tokens: list[int]
    labels: list[int]
    turn_ids: list[int]
    images: list[ImagePatches] = field(default_factory=list)
    key: str = ""

    def __len__(self) -> int:
        return len(self.tokens)


def _check_sample(sample: Sample, image_token_id: int, merge: int) -> None:
    n = len(sample.tokens)
    if len(sample.labels) != n or len(sample.turn_ids) != n:
        raise ValueError(
            f"sample {sample.key!r}: tokens ({n}), labels ({len(sample.labels)}) and turn_ids "
            f"({len(sample.turn_ids)}) must have the same length"
        )
    pads = sum(1 for t in sample.tokens if t == image_token_id)
    wanted = sum(image.num_tokens(merge) for image in sample.images)
    if pads != wanted:
        raise ValueError(
            f"sample {sample.key!r}: {pads} image-pad tokens but its {len(sample.images)} images "
            f"need {wanted}"
        )


def mrope_position_ids(sample: Sample, image_token_id: int, merge: int) -> torch.Tensor:
    """Qwen2-VL multimodal RoPE positions [3, len] (temporal, row, column) for one sample.

    Text advances all three components together; an image's tokens share the
    starting position and spread over its merged grid; the text after an image
    continues from the largest position used so far, plus one.
    """
    positions = torch.zeros(3, len(sample.tokens), dtype=torch.long)
    images = iter(sample.images)
    next_pos = 0
    i = 0
    while i < len(sample.tokens):
        if sample.tokens[i] != image_token_id:
            positions[:, i] = next_pos
            next_pos += 1
            i += 1
            continue
        t, h, w = next(images).grid_thw
        h, w = h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        span = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + next_pos
        positions[:, i : i + span.shape[1]] = span
        next_pos = int(span.max()) + 1
        i += span.shape[1]
    return positions


def sequential_position_ids(sample: Sample) -> torch.Tensor:
    """Every token one position after the last, image tokens too (LLaVA, Idefics3): [3, len],
    the three rows equal, so a 1-D RoPE LM reads row 0 as for spatial positions."""
    return torch.arange(len(sample.tokens), dtype=torch.long).expand(3, -1)


def pack_row(
    samples: Sequence[Sample], seq_length: int, image_token_id: int, merge: int, pad_token_id: int = 0,
    positions: str = "spatial",
) -> dict:
    """Concatenates samples into one row of exactly seq_length tokens (padding at the end).

    positions: model.lm.image_positions, how image tokens are numbered (spatial: Qwen's
    multimodal ids; sequential: one after another, like text)."""
    if positions not in ("spatial", "sequential"):
        raise ValueError(f"positions = {positions!r}: must be spatial or sequential (model.lm.image_positions)")
    total = sum(len(s) for s in samples)
    if total > seq_length:
        raise ValueError(f"samples of {total} tokens do not fit in seq_length={seq_length}")
    row = {
        "tokens": torch.full((seq_length,), pad_token_id, dtype=torch.long),
        "labels": torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long),
        "document_ids": torch.full((seq_length,), PAD_DOCUMENT_ID, dtype=torch.long),
        "image_ids": torch.full((seq_length,), TEXT_IMAGE_ID, dtype=torch.long),
        "turn_ids": torch.zeros(seq_length, dtype=torch.long),
        "position_ids": torch.zeros(3, seq_length, dtype=torch.long),
        "images": [],
    }
    start = 0
    for doc, sample in enumerate(samples):
        _check_sample(sample, image_token_id, merge)
        end = start + len(sample)
        tokens = torch.tensor(sample.tokens, dtype=torch.long)
        row["tokens"][start:end] = tokens
        row["labels"][start:end] = torch.tensor(sample.labels, dtype=torch.long)
        row["document_ids"][start:end] = doc
        row["turn_ids"][start:end] = torch.tensor(sample.turn_ids, dtype=torch.long)
        row["position_ids"][:, start:end] = (
            mrope_position_ids(sample, image_token_id, merge) if positions == "spatial"
            else sequential_position_ids(sample)
        )
        image_ids = row["image_ids"][start:end]
        slots = (tokens == image_token_id).nonzero().flatten().tolist()
        cursor = 0
        for image in sample.images:
            n = image.num_tokens(merge)
            image_ids[slots[cursor : cursor + n]] = len(row["images"])
            row["images"].append(image)
            cursor += n
        start = end
    return row


def collate_rows(rows: Sequence[dict]) -> Microbatch:
    """Stacks packed rows into a microbatch (megavl/models/inputs.py); images are concatenated in token order."""
    images = [image for row in rows for image in row["images"]]
    labels = torch.stack([r["labels"] for r in rows])
    batch = {
        key: torch.stack([r[key] for r in rows])
        for key in ("tokens", "document_ids", "image_ids", "turn_ids")
    }
    batch["position_ids"] = torch.stack([r["position_ids"] for r in rows], dim=1)  # [3, b, s]
    batch["loss_mask"] = labels != IGNORE_INDEX
    batch["labels"] = labels.clamp(min=0)  # megatron's cross entropy wants valid ids
    if images:
        batch["pixel_values"] = torch.cat([im.pixel_values for im in images])
        batch["image_grid_thw"] = torch.tensor([im.grid_thw for im in images], dtype=torch.long)
    else:
        batch["pixel_values"] = None
        batch["image_grid_thw"] = None
    return batch
