"""Decoding a step's images in the training process, after the data loader, on the training device.

With ``data.decode_images_in = trainer`` (auto picks it for DALI on CUDA) the
loader plans and packs records as always, but a pack carries each image's
encoded bytes and plan (EncodedImage) instead of pixels. Pixels decoded on a
GPU cannot travel through the loader: energon's DataLoader pins its batches'
memory, which CUDA tensors refuse, forked workers cannot use CUDA at all, and
vision-token balancing would pickle them to other ranks. Bytes travel everywhere.

After the step's microbatches are assigned to this rank (data/distribute.py),
TrainerImageDecoder renders each microbatch's images in one back-end batch
(DALI's nvJPEG and GPU resize on CUDA) and fills ``pixel_values`` on that
device, in token order, exactly as the loader would have. The parts of an image
are cut and normalised by the same code as in the loader (image_rendering.py),
so the same back end gives the same pixels in either place.

An image whose bytes fail only when decoded (the header was read when the
record was planned) fails its record as ``bad_image``, as in the loader. The
record is already packed into a row, so it is not removed. Its loss is masked
and its image parts are zeros (the normalised mean colour). The attention mask
keeps every document apart, so the other records of the row are unaffected.
The failure is returned for the stream's counts and the log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megavl.config import Config
from megavl.data.image_backends import select_backend
from megavl.data.image_rendering import planned_patches, render_by_owner
from megavl.data.resolution import ImagePlan

# (dataset, key, reason, detail), as collate_packs reports the loader's failures.
Failure = tuple[str, str, str, str]


@dataclass(frozen=True)
class EncodedImage:
    """One image of a packed record, still encoded; ``row`` is set when packs are collated."""

    data: bytes
    plan: ImagePlan
    document: int  # the record's document id within its row
    index: int  # the image's number within its record (the ``img<index>`` member)
    key: str
    dataset: str
    row: int = -1


def decode_place(config: Config, device: Optional[torch.device] = None) -> str:
    """"loader" or "trainer": where data.decode_images_in puts decoding for a run on device
    (None: CUDA when available). auto is the trainer only where it gains: DALI on CUDA."""
    place = config.data.decode_images_in
    if place != "auto":
        return place
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "trainer" if on_cuda and config.data.image_backend == "dali" else "loader"


def with_rows(encoded_per_row: list[list[EncodedImage]]) -> list[EncodedImage]:
    """The microbatch's encoded images in token order, each marked with its row."""
    return [dataclasses.replace(image, row=row) for row, images in enumerate(encoded_per_row) for image in images]


class TrainerImageDecoder:
    """Renders microbatches' encoded images on the training device (see the module doc)."""

    def __init__(self, config: Config, device: Optional[torch.device] = None):
        self.config = config
        self.backend = select_backend(config.data.image_backend, device,
                                      max_image_pixels=config.data.max_image_pixels)
        v = config.model.vision
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size

    def decode(self, batch: dict) -> list[Failure]:
        """Fills batch["pixel_values"] from batch["encoded_images"] (removed) and masks the loss of
        records whose images fail; returns those failures. A batch without encoded images is left as it is."""
        encoded: Optional[list[EncodedImage]] = batch.pop("encoded_images", None)
        if encoded is None:
            return []
        owners = [(image.row, image.document) for image in encoded]
        rendered, failed = render_by_owner(self.backend, [(image.data, image.plan) for image in encoded], owners)
        grids = batch["image_grid_thw"].tolist() if batch["image_grid_thw"] is not None else []
        pixels, cursor = [], 0
        for image, parts in zip(encoded, rendered):
            planned = grids[cursor : cursor + len(image.plan.parts)]
            cursor += len(image.plan.parts)
            if parts is not None:
                pixels += [p.pixel_values for p in planned_patches([parts], self.config.model.vision, planned, image.key)]
            else:
                pixels += [torch.zeros(t * h * w, self.patch_dim, device=self.backend.output_device)
                           for t, h, w in planned]
        if cursor != len(grids):
            raise RuntimeError(f"the microbatch has {len(grids)} image parts but its encoded images plan {cursor}")
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        failures: list[Failure] = []
        for (row, document), (item, error) in failed.items():
            batch["loss_mask"][row][batch["document_ids"][row] == document] = False
            bad = encoded[item]
            failures.append((bad.dataset, bad.key, "bad_image", f"img{bad.index}: {error.reason}"))
        return failures
