"""megatron's top-k router, with the load-balancing loss made layout-independent and statistics.

Two additions to ``TopKRouter``:

* With sequence parallelism each tensor-parallel rank routes a slice of the
  sequence. In per-token-loss mode megatron's load-balancing and z losses then
  shrink with the TP size (the former is normalised by the whole sequence's
  token count but scaled back by the slice's, the latter divided by the TP
  size). Scaling both as the whole sequence makes TP=2 train like one process.
* When ``RouterStatistics`` is collecting, it records, per layer, how many text
  and vision tokens each expert received and the entropy of the router's
  distribution (one router serves both modalities).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker, z_loss_func
from megatron.core.transformer.moe.router import TopKRouter

from megavl.models.modality import current_vision_mask, local_tokens


class RouterStatistics:
    """Per-layer expert load (text / vision) and router entropy, summed until read."""

    enabled = False
    _sums: dict = {}

    @classmethod
    def start(cls) -> None:
        cls.enabled = True
        cls._sums = {}

    @classmethod
    def stop(cls) -> dict:
        """{layer_number: {"text": [E], "vision": [E], "entropy_sum": float, "tokens": int}}, local to this rank."""
        cls.enabled = False
        sums, cls._sums = cls._sums, {}
        return sums

    @classmethod
    def record(cls, layer: int, logits: torch.Tensor, routing_map: torch.Tensor, vision: Optional[torch.Tensor]) -> None:
        probs = torch.softmax(logits.float(), dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(-1)
        chosen = routing_map.to(torch.int64)
        if vision is None:
            vision = torch.zeros(chosen.shape[0], dtype=torch.bool, device=chosen.device)
        entry = cls._sums.setdefault(
            layer,
            {"text": torch.zeros(chosen.shape[1], dtype=torch.int64), "vision": torch.zeros(chosen.shape[1], dtype=torch.int64),
             "entropy_sum": 0.0, "tokens": 0},
        )
        entry["text"] += chosen[~vision].sum(0).cpu()
        entry["vision"] += chosen[vision].sum(0).cpu()
        entry["entropy_sum"] += float(entropy.sum())
        entry["tokens"] += int(chosen.shape[0])


class MegavlRouter(TopKRouter):
    def gating(self, input: torch.Tensor):
        logits = super().gating(input)
        if RouterStatistics.enabled:
            self._last_logits = logits.detach()
        return logits

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask)
        if RouterStatistics.enabled:
            mask = current_vision_mask()
            vision = None if mask is None else local_tokens(mask, self.config.sequence_parallel)
            RouterStatistics.record(self.layer_number, self._last_logits, routing_map, vision)
            self._last_logits = None
        return probs, routing_map

    def apply_z_loss(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """megatron divides the z-loss by the TP size; in per-token mode that halves it at TP=2."""
        coeff = self.config.moe_z_loss_coeff
        if not self.calculate_per_token_loss or coeff is None or not self.training or not torch.is_grad_enabled():
            return super().apply_z_loss(logits, padding_mask)
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)  # mean over this rank's tokens
        num_tokens = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
        # Summed over the TP ranks' slices this is the whole sequence's z-loss.
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss * num_tokens)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number, self.config.num_layers)
        return logits

    def attach_and_log_load_balancing_loss(
        self,
        activation,
        aux_loss_coeff,
        aux_loss,
        aux_loss_name,
        reduce_group,
        reduce_group_has_dp: bool = False,
        valid_token_count=None,
    ):
        if (
            self.calculate_per_token_loss
            and aux_loss_name == "load_balancing_loss"
            and valid_token_count is not None
            and reduce_group is not None
        ):
            # The loss was normalised by the tokens of the whole (TP-split) sequence.
            valid_token_count = valid_token_count * reduce_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count,
        )
