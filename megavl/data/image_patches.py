"""Images -> flattened 14x14 patches in the order the vision encoder expects."""

from __future__ import annotations

import torch


def image_to_patches(
    image: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2, merge: int = 2
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """A normalised image [C, H, W] -> (pixel_values [N, C*T*P*P], grid (t, h, w) in patches).

    H and W must be multiples of patch_size * merge. A still image is repeated
    temporal_patch_size times, as Qwen2-VL does, so one checkpoint serves
    images and video. Patches come out grouped by merge x merge block.
    """
    if image.dim() != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    unit = patch_size * merge
    if height % unit or width % unit:
        raise ValueError(
            f"image size {height}x{width} must be a multiple of patch_size*merge = {unit} on both sides"
        )
    gh, gw = height // patch_size, width // patch_size
    frames = image.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)  # [T, C, H, W]
    patches = frames.reshape(
        1, temporal_patch_size, channels, gh // merge, merge, patch_size, gw // merge, merge, patch_size
    )
    # -> (grid_t, block_row, block_col, row_in_block, col_in_block, C, T, P, P)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = patches.reshape(gh * gw, channels * temporal_patch_size * patch_size * patch_size)
    return pixel_values.contiguous(), (1, gh, gw)
