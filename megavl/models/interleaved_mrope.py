"""Qwen3-VL's interleaved multimodal RoPE, as a drop-in for megatron-core's MultimodalRotaryEmbedding.

Multimodal RoPE gives each rotary frequency of a head one of the three position
axes (temporal, height, width). megatron-core lays them out in sections, as
Qwen2-VL and Qwen2.5-VL do: the first ``mrope_section[0]`` frequencies follow the
temporal position, the next ``mrope_section[1]`` the height, the rest the width.
Qwen3-VL interleaves them instead (``model.lm.mrope_layout = interleaved``):
frequency j follows the height when j % 3 == 1 and j < 3 * mrope_section[1], the
width when j % 3 == 2 and j < 3 * mrope_section[2], and the temporal position
otherwise, so every axis gets low and high frequencies alike.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding


def interleaved_axes(mrope_section: Sequence[int], frequencies: int) -> list[int]:
    """The axis (0 temporal, 1 height, 2 width) of each of a head's rotary frequencies."""
    axes = [0] * frequencies
    for axis, count in ((1, mrope_section[1]), (2, mrope_section[2])):
        slots = range(axis, 3 * count, 3)
        if count and slots[-1] >= frequencies:
            raise ValueError(f"mrope_section {list(mrope_section)}: axis {axis} needs frequency {slots[-1]}, "
                             f"but a head has {frequencies}")
        for j in slots:
            axes[j] = axis
    return axes


class InterleavedMultimodalRotaryEmbedding(MultimodalRotaryEmbedding):
    """megatron-core's multimodal RoPE with the frequencies interleaved over the axes (see the module doc).

    Takes the same arguments and returns the same [seq, batch, 1, head_dim] angles, so GPTModel uses it as it is.
    """

    def forward(self, position_ids: torch.Tensor, mrope_section: list[int],
                cp_group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
        positions = position_ids.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        # [3, b, s, frequencies]: each axis's position times every frequency (a product per
        # element, as megatron's [f, 1] @ [1, s] matmul computes it).
        freqs = positions[..., None].float() * self.inv_freq
        axes = torch.tensor(interleaved_axes(mrope_section, freqs.shape[-1]), device=freqs.device)
        chosen = freqs.gather(0, axes.expand(1, *freqs.shape[1:])).squeeze(0)  # [b, s, frequencies]
        if self.rotary_interleaved:
            emb = torch.stack((chosen, chosen), dim=-1).flatten(-2)
        else:
            emb = torch.cat((chosen, chosen), dim=-1)
        emb = emb[..., None, :].transpose(0, 1).contiguous()  # [s, b, 1, head_dim]
        cp_group = cp_group if cp_group is not None else self.cp_group
        if cp_group is not None and cp_group.size() > 1:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb
