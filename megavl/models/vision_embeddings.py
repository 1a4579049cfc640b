"""Absolute position tables and class tokens of the SigLIP / CLIP towers.

Patches arrive packed (all images of a microbatch in one sequence) in the order
megavl/data/image_patches.py emits them, grouped by merge block, so a patch's
position is read from its (row, column) coordinate, never from its index in the
sequence. A table trained for one grid is resized for another grid bicubically,
as Hugging Face's ``interpolate_pos_encoding`` does (or bilinearly with antialiasing,
as SigLIP2 does for native aspect ratios), so the same weights serve any image size
the resolution policy asks for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LearnedPositionEmbedding(torch.nn.Module):
    """A [positions, hidden] table: the class token's row (if any), then side x side patch rows.

    With a class token it also holds the token's embedding (CLIP's class_embedding).
    """

    def __init__(self, side: int, hidden: int, class_token: bool, dtype: torch.dtype,
                 interpolation: str = "bicubic"):
        super().__init__()
        self.side = side
        self.interpolation = interpolation
        self.class_rows = int(class_token)
        self.weight = torch.nn.Parameter(torch.empty(side * side + self.class_rows, hidden, dtype=dtype))
        if class_token:
            self.class_embedding = torch.nn.Parameter(torch.empty(hidden, dtype=dtype))

    def class_token(self) -> torch.Tensor:
        """The class token with its position embedding [hidden]."""
        return self.class_embedding + self.weight[0]

    def grid_table(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings [rows * cols, hidden] of a rows x cols patch grid, row-major."""
        table = self.weight[self.class_rows:]
        if (rows, cols) == (self.side, self.side):
            return table
        hidden = table.shape[-1]
        grid = table.reshape(1, self.side, self.side, hidden).permute(0, 3, 1, 2)
        if self.interpolation == "bilinear_antialias":
            resized = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
        else:
            resized = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(rows * cols, hidden)

    def forward(self, grid_thw: list, coords: torch.Tensor) -> torch.Tensor:
        """Each patch's position embedding [N, hidden]; coords are (image, t, row, col) per patch."""
        tables: dict[tuple[int, int], torch.Tensor] = {}
        pieces, start = [], 0
        for t, h, w in grid_thw:
            if (h, w) not in tables:
                tables[(h, w)] = self.grid_table(h, w)
            count = t * h * w
            rows, cols = coords[start:start + count, 2], coords[start:start + count, 3]
            pieces.append(tables[(h, w)][rows * w + cols])
            start += count
        if not pieces:
            return self.weight.new_zeros(0, self.weight.shape[-1])
        return torch.cat(pieces)


def class_token_rows(image_of_patch: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where patches and class tokens go when each image's class token precedes its patches.

    Returns (row of each patch, row of each image's class token) in the sequence of
    patches + images rows. Patches of one image are contiguous and images in order.
    """
    patch_rows = torch.arange(image_of_patch.numel(), device=image_of_patch.device) + image_of_patch + 1
    counts = torch.bincount(image_of_patch, minlength=images)
    starts = torch.cumsum(counts, 0) - counts  # first patch index of each image
    class_rows = starts + torch.arange(images, device=image_of_patch.device)
    return patch_rows, class_rows


def insert_class_tokens(hidden: torch.Tensor, image_of_patch: torch.Tensor, images: int,
                        class_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, hidden] patches -> ([N + images, hidden] with a class token before each image,
    the image of every row, the rows that hold patches)."""
    patch_rows, class_rows = class_token_rows(image_of_patch, images)
    total = hidden.shape[0] + images
    out = hidden.new_zeros(total, hidden.shape[1])
    out = out.index_copy(0, patch_rows, hidden)
    out = out.index_copy(0, class_rows, class_embedding.to(hidden.dtype).expand(images, -1))
    image_of_row = torch.empty(total, dtype=image_of_patch.dtype, device=image_of_patch.device)
    image_of_row[patch_rows] = image_of_patch
    image_of_row[class_rows] = torch.arange(images, device=image_of_patch.device, dtype=image_of_patch.dtype)
    return out, image_of_row, patch_rows
