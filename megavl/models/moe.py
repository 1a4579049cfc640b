"""megatron's MoE layer pieces as megavl uses them.

``VisionAwareMoELayer`` / ``VisionAwareSequentialMLP`` carry each token's
vision flag to the expert that computes it (for vision-only LoRA), when the
layer spec builds them with ``carry_vision_flags=True``.

``MegavlSequentialMLP`` has DDP sum the experts' gradients over every rank
that holds a copy of them, also without expert parallelism.

``MegavlRouter`` adds two things to ``TopKRouter``:

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
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megavl.models.modality import current_vision_mask, expert_rows, local_tokens


class RouterStatistics:
    """Per-layer expert load (text / vision) and router entropy, summed until read.

    The sums stay on the device the router runs on: recording costs no host sync, and the
    step's totals reach the host once, when moe_metrics reduces them on a logging step."""

    enabled = False
    _sums: dict = {}

    @classmethod
    def start(cls) -> None:
        cls.enabled = True
        cls._sums = {}

    @classmethod
    def stop(cls) -> dict:
        """{layer_number: {"text": [E], "vision": [E], "entropy_sum": 0-d, "tokens": int}}, local to this
        rank; the tensors on the router's device."""
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
        entry = cls._sums.get(layer)
        if entry is None:
            zeros = torch.zeros(chosen.shape[1], dtype=torch.int64, device=chosen.device)
            entry = cls._sums[layer] = {"text": zeros, "vision": zeros.clone(),
                                        "entropy_sum": torch.zeros((), dtype=torch.float64, device=chosen.device),
                                        "tokens": 0}
        # Masked sums (a multiply, not boolean indexing, whose output size would need a sync).
        is_vision = vision.to(torch.int64)[:, None]
        entry["vision"] += (chosen * is_vision).sum(0)
        entry["text"] += (chosen * (1 - is_vision)).sum(0)
        entry["entropy_sum"] += entropy.sum().double()
        entry["tokens"] += chosen.shape[0]  # a shape: known on the host


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


class VisionAwareMoELayer(MoELayer):
    """megatron's MoE layer whose tokens carry their vision flag through the dispatcher.

    The flag rides as one extra hidden column: every dispatcher (all-to-all,
    all-gather, with or without EP) permutes and exchanges whole rows, so each
    expert receives exactly the flags of the tokens it got. The router and the
    shared expert see the hidden states without it. ``carry_vision_flags``
    (from the layer spec's params) is False where no expert adapter is active;
    the experts must then be built with the same value.
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, *,
                 carry_vision_flags: bool):
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection)
        self.carry_vision_flags = carry_vision_flags

    def preprocess(self, hidden_states, probs, routing_map):
        if self.carry_vision_flags:
            mask = current_vision_mask()
            if mask is None:
                flags = torch.zeros(hidden_states.shape[:-1], dtype=hidden_states.dtype, device=hidden_states.device)
            else:
                flags = local_tokens(mask, self.config.sequence_parallel).view(hidden_states.shape[:-1])
            hidden_states = torch.cat([hidden_states, flags.unsqueeze(-1).to(hidden_states.dtype)], dim=-1)
        return super().preprocess(hidden_states, probs, routing_map)

    def postprocess(self, output, shared_expert_output):
        output = self.token_dispatcher.combine_postprocess(output)
        if self.carry_vision_flags:
            output = output[..., :-1]
        if shared_expert_output is not None:
            output = output + shared_expert_output
        return output


class MegavlSequentialMLP(SequentialMLP):
    """megatron's local experts, with their gradients reduced over every rank that holds a copy.

    megatron marks expert weights for the expert data-parallel reduction only
    under expert parallelism (``allreduce = False`` when EP > 1); otherwise DDP
    treats them as dense weights and reduces them over the dense data-parallel
    group alone. With EP = 1 and an expert tensor size below the TP size (the
    default ``expert_tensor = 1`` with TP = 2), every TP rank holds whole
    experts, but with sequence parallelism each rank's experts compute only the
    tokens of its own slice of the sequence, so each rank's gradient is a
    partial sum that the dense reduction never adds up: the replicas on the TP
    ranks then step with different gradients and drift apart. The expert
    data-parallel group spans exactly the ranks with a copy of these experts
    (TP and DP ranks alike), so marking the weights as expert weights makes DDP
    sum them there and the optimizer treat them like megatron's EP > 1 experts.
    When the expert tensor size equals the TP size (as at TP = 1 with the
    default expert_tensor = 1) the two groups coincide and nothing changes.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if pg_collection is not None and pg_collection.expt_tp.size() != pg_collection.tp.size():
            for param in self.parameters():
                param.allreduce = False


class VisionAwareSequentialMLP(MegavlSequentialMLP):
    """Local experts that strip the vision-flag column and tell their LoRA linears which rows are vision.

    ``carry_vision_flags`` must match the ``VisionAwareMoELayer`` they belong to.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, *, carry_vision_flags: bool):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.carry_vision_flags = carry_vision_flags

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if not self.carry_vision_flags:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        # Contiguous like the tensor experts get without the flag column, so the
        # same kernels run and a fresh adapter leaves outputs bit-identical.
        hidden = permuted_local_hidden_states[..., :-1].contiguous()
        flags = permuted_local_hidden_states[..., -1] > 0.5
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) else list(tokens_per_expert)
        outputs = []
        for expert, tokens, probs, rows in zip(
            self.local_experts, hidden.split(counts), permuted_probs.split(counts), flags.split(counts)
        ):
            with expert_rows(rows):
                output, _ = expert(tokens, probs)
            outputs.append(output)
        output = torch.cat(outputs, dim=0)
        # The zero column keeps the row width the dispatcher expects on the way back.
        return torch.cat([output, output.new_zeros(output.shape[0], 1)], dim=-1), None
