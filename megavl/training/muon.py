"""Muon for the matrices of the language model and the adapter, AdamW for everything else
(``train.optimizer: muon``).

The Muon side is emerging-optimizers' Muon (the package megatron-core's Muon builds on) with
tensor-parallel orthogonalisation (``tensor_parallel_muon_class``): momentum, then Newton-Schulz
orthogonalisation of each 2-D weight, with the TP shards of a matrix gathered
(``train.muon.tp_mode: duplicated``) or orthogonalised jointly (``distributed``) so the update
does not depend on the TP size. It sits in megatron's optimizer wrappers (fp32 / bf16 master
weights, the chain, gradient clipping over all parameters), and the AdamW side is megatron's
usual optimizer, built for the remaining parameters only.

megavl chooses the parameters itself instead of following megatron's
``get_megatron_muon_optimizer``, which gives Muon every 2-D weight but the embeddings: the
vision tower (pretrained, usually frozen or trained gently) and the vision-LoRA adapters keep
AdamW here, as the recipes that use Muon do.

With ``parallel.distributed_optimizer`` the chain is wrapped in megatron's
``LayerWiseDistributedOptimizer``: each DP rank keeps optimizer state for whole weights (a
Newton-Schulz step needs the whole matrix, which megatron's element-sharded distributed
optimizer cannot give), updates them and all-gathers the result. Its saved state only fits the
same DP size (see ``optimizer_form``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from megavl.config import Config
from megavl.models.parts import part_of
from megavl.models.transformer_configs import lm_transformer_config

# The parts whose 2-D weights Muon updates.
MUON_PARTS = ("lm", "router", "adapter")
INSTALL_HINT = (
    "pip install emerging-optimizers (on Python 3.11: pip install --no-deps --ignore-requires-python "
    "emerging-optimizers==0.3.0 absl-py triton, as the Makefile does)"
)


def uses_muon(name: str, param: torch.nn.Parameter) -> bool:
    """Whether Muon updates this (trainable) parameter: a 2-D weight of the LM, its router or the adapter."""
    return param.requires_grad and param.dim() == 2 and part_of(name, param) in MUON_PARTS


def emerging_optimizers():
    """The emerging-optimizers package (Muon's momentum, Newton-Schulz and update scales), or a
    clear error naming what to install.

    emerging-optimizers 0.3 declares Python >= 3.12 for one reason on the path used here:
    ``typing.override``, a no-op decorator that typing_extensions provides on 3.11.
    """
    if sys.version_info < (3, 12):
        import typing

        import typing_extensions

        if not hasattr(typing, "override"):
            typing.override = typing_extensions.override
    try:
        import emerging_optimizers.orthogonalized_optimizers as orthogonalized
        from emerging_optimizers.orthogonalized_optimizers import muon_utils
    except ImportError as e:
        raise RuntimeError(
            f"train.optimizer = muon needs the emerging-optimizers package ({e}); install it: {INSTALL_HINT}"
        ) from e
    return orthogonalized, muon_utils


def tensor_parallel_muon_class():
    """emerging-optimizers' Muon, orthogonalising TP-sharded weights as whole matrices.

    megatron-core 0.16's ``TensorParallelMuon`` does the same but calls emerging-optimizers
    with keywords (``use_nesterov``, ``mode``) that 0.3, the release on PyPI, renamed, so it
    cannot be built; this class follows its design on today's API. A weight's shard is
    gathered over its TP group (``tp_mode: duplicated``) or orthogonalised jointly
    (``distributed``) along megatron's ``partition_dim``, and the update is scaled by the whole
    matrix's shape; ``blockwise`` orthogonalises each shard alone. A fused QKV weight is split
    into its query, key and value rows per query group first (``split_qkv``).
    """
    orthogonalized, muon_utils = emerging_optimizers()

    class TensorParallelMuon(orthogonalized.Muon):
        def __init__(self, params, *, tp_group, expert_tp_group, tp_mode: str, qkv_split_shapes,
                     split_qkv: bool, num_ns_steps: int, scale_mode: str, extra_scale_factor: float, **kwargs):
            super().__init__(params, num_ns_steps=num_ns_steps, scale_mode=scale_mode,
                             extra_scale_factor=extra_scale_factor, **kwargs)
            self.tp_group, self.expert_tp_group, self.tp_mode = tp_group, expert_tp_group, tp_mode
            self.qkv_split_shapes, self.split_qkv = tuple(qkv_split_shapes), split_qkv
            self.num_ns_steps, self.scale_mode, self.extra_scale_factor = num_ns_steps, scale_mode, extra_scale_factor

        def _orthogonalised(self, grad, group, partition_dim):
            rows, cols = grad.shape
            if partition_dim is not None and group is not None and group.size() > 1 and self.tp_mode != "blockwise":
                if partition_dim == 0:
                    rows *= group.size()
                else:
                    cols *= group.size()
                orth = muon_utils.newton_schulz_tp(grad, steps=self.num_ns_steps, coefficient_type="quintic",
                                                   tp_group=group, partition_dim=partition_dim, tp_mode=self.tp_mode)
            else:
                orth = muon_utils.newton_schulz(grad, steps=self.num_ns_steps, coefficient_type="quintic")
            scale = orthogonalized.get_muon_scale_factor(rows, cols, mode=self.scale_mode)
            return orth * scale * self.extra_scale_factor

        def orthogonalize(self, p, grad, **kwargs):
            group = self.expert_tp_group if getattr(p, "expert_tp", False) else self.tp_group
            partition_dim = getattr(p, "partition_dim", -1) if getattr(p, "tensor_model_parallel", False) else -1
            partition_dim = None if partition_dim == -1 else partition_dim
            if not (self.split_qkv and getattr(p, "is_qkv", False)):
                return self._orthogonalised(grad, group, partition_dim)
            # Rows are [q of group 0, k of group 0, v of group 0, q of group 1, ...]; TP holds
            # whole query groups, so each block's rows stay in order when gathered.
            shape, per_group = grad.shape, sum(self.qkv_split_shapes)
            blocks = torch.split(grad.view(shape[0] // per_group, per_group, shape[1]), self.qkv_split_shapes, dim=1)
            done = [self._orthogonalised(b.reshape(-1, shape[1]), group, partition_dim).view(b.shape) for b in blocks]
            return torch.cat(done, dim=1).view(shape)

    return TensorParallelMuon


@contextlib.contextmanager
def _only_trainable(model_chunks: list, keep: set) -> Iterator[None]:
    """Inside, only the parameters in ``keep`` require gradients (megatron builds param groups
    from the parameters that do); afterwards every flag is as before."""
    changed = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            if param.requires_grad and id(param) not in keep:
                param.requires_grad_(False)
                changed.append(param)
    try:
        yield
    finally:
        for param in changed:
            param.requires_grad_(True)


def _muon_parameters(model_chunks: list) -> list[torch.nn.Parameter]:
    chosen = []
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not uses_muon(name, param):
                continue
            # The flags megatron's Muon reads: expert weights orthogonalise over the expert-TP
            # group, a fused QKV weight splits into its query, key and value blocks.
            if ".experts." in name and "shared_experts" not in name:
                param.expert_tp = True
            if name.endswith("linear_qkv.weight"):
                param.is_qkv = True
            chosen.append(param)
    return chosen


def describe_split(model_chunks: list) -> str:
    """One line: what Muon and what AdamW update on this rank."""
    counts = {"Muon": [0, 0], "AdamW": [0, 0]}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if param.requires_grad:
                entry = counts["Muon" if uses_muon(name, param) else "AdamW"]
                entry[0] += 1
                entry[1] += param.numel()
    return "optimizer: " + "; ".join(
        f"{kind} for {tensors} tensors ({elements:,} parameters)" for kind, (tensors, elements) in counts.items()
    ) + " on this rank (Muon: 2-D weights of the LM, its router and the adapter)"


def build_muon_chain(config: Config, model_chunks: list, optimizer_config, overrides: dict):
    """Muon for the LM's and adapter's matrices chained with AdamW for the rest."""
    from megatron.core.optimizer import _get_param_groups, get_megatron_optimizer
    from megatron.core.optimizer.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection

    muon_class = tensor_parallel_muon_class()
    m = config.train.muon
    layer_wise = config.parallel.distributed_optimizer
    # megatron's element-sharded distributed optimizer cannot hold whole matrices; the layer-wise
    # wrapper below shards by weight instead, over plain DDP gradients.
    optimizer_config.use_distributed_optimizer = False
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    lm_config = lm_transformer_config(config)
    kv = lm_config.kv_channels
    per_group_query = lm_config.num_attention_heads // lm_config.num_query_groups
    muon_kwargs = dict(
        lr=config.train.lr,
        momentum=m.momentum,
        nesterov=m.nesterov,
        weight_decay=config.train.weight_decay,
        # fp32 matmuls in full precision: on GPUs "medium" (bf16x3) is megatron's choice for speed.
        fp32_matmul_prec="highest",
        num_ns_steps=m.ns_steps,
        scale_mode=m.scale_mode,
        extra_scale_factor=m.extra_scale_factor,
        split_qkv=m.split_qkv,
        qkv_split_shapes=(per_group_query * kv, kv, kv),
        tp_group=pg_collection.tp,
        expert_tp_group=pg_collection.expt_tp,
        tp_mode=m.tp_mode,
    )

    def init_momentum(opt, _config=None):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)

    def wrapped(inner):
        if layer_wise:
            return FP32Optimizer(inner, optimizer_config, init_momentum)  # the layer-wise wrapper re-wraps for bf16
        if optimizer_config.bf16:
            return Float16OptimizerWithFloat16Params(inner, optimizer_config, None, init_momentum)
        return FP32Optimizer(inner, optimizer_config, init_momentum)

    # The layer-wise wrapper adds the bf16 master weights itself, after sharding (so each rank
    # keeps fp32 copies of its own weights only); everything inside it is built as fp32.
    bf16 = optimizer_config.bf16
    if layer_wise:
        optimizer_config.bf16 = False
    matrices = {id(p) for p in _muon_parameters(model_chunks)}
    with _only_trainable(model_chunks, matrices):
        groups = _get_param_groups(model_chunks, optimizer_config, overrides)
    for group in groups:
        # The scheduler sets each group's lr from its max_lr / min_lr.
        group["max_lr"] *= m.lr_mult
        group["min_lr"] *= m.lr_mult
    dense = [g for g in groups if not g["is_expert_parallel"]]
    expert = [g for g in groups if g["is_expert_parallel"]]
    optimizers = []
    for part_groups in (dense, expert):
        if part_groups:
            optimizers.append(wrapped(muon_class(part_groups, **muon_kwargs)))
    if expert and not layer_wise:
        # Expert weights differ across expert-parallel ranks: their norm sums over TP x EP x PP.
        optimizers[-1].grad_stats_parallel_group = pg_collection.tp_ep_pp
    init_fns = [init_momentum] * len(optimizers)

    rest = [p for chunk in model_chunks for p in chunk.parameters() if p.requires_grad and id(p) not in matrices]
    if rest:
        with _only_trainable(model_chunks, {id(p) for p in rest}):
            adam = get_megatron_optimizer(optimizer_config, model_chunks, config_overrides=overrides)
        for inner in getattr(adam, "chained_optimizers", [adam]):
            optimizers.append(inner)
            init_fns.append(inner.init_state_fn)
    if layer_wise:
        optimizer_config.bf16 = bf16
        return layer_wise_class()(optimizers, optimizer_config, pg_collection,
                                  init_state_fn_list=init_fns if bf16 else None)
    return ChainedOptimizer(optimizers)


def layer_wise_class():
    """megatron's LayerWiseDistributedOptimizer; over gloo its all-gather of the updated weights
    pads every rank's share to the largest (gloo's all_gather takes equal sizes only, NCCL's
    takes uneven ones)."""
    import torch.distributed as dist
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    class LayerWiseOptimizer(LayerWiseDistributedOptimizer):
        def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False, **kwargs):
            if self.config.bf16:
                return super().sharded_state_dict(model_sharded_state_dict, is_loading, **kwargs)
            return _fp32_layer_wise_sharded_state(self, model_sharded_state_dict, is_loading, **kwargs)

        @torch.no_grad()
        def allgather_params(self) -> None:
            if self.pg_collection is None or dist.get_backend(self.pg_collection.dp_cp) != "gloo":
                return super().allgather_params()
            for params_list, group in ((self.dp_cp_params_list, self.pg_collection.dp_cp),
                                       (self.expt_dp_params_list, self.pg_collection.expt_dp)):
                if params_list:
                    _padded_allgather(params_list, group)

    def _padded_allgather(params_list, group) -> None:
        sample = next(p for params in params_list for p in params)
        sizes = [sum(p.numel() for p in params) for params in params_list]
        rank, longest = group.rank(), max(sizes)
        mine = params_list[rank]
        flat = _flatten_dense_tensors(mine) if mine else torch.empty(0, dtype=sample.dtype, device=sample.device)
        padded = torch.zeros(longest, dtype=sample.dtype, device=sample.device)
        padded[: flat.numel()] = flat
        gathered = [torch.empty_like(padded) for _ in params_list]
        dist.all_gather(gathered, padded, group=group)
        for other, (flat_other, params) in enumerate(zip(gathered, params_list)):
            if other == rank or not params:
                continue
            for value, param in zip(_unflatten_dense_tensors(flat_other[: sizes[other]], params), params):
                param.data.copy_(value)

    return LayerWiseOptimizer


def _fp32_layer_wise_sharded_state(optimizer, model_sharded_state_dict, is_loading: bool, **kwargs):
    """The layer-wise optimizer's checkpoint form for fp32 inner optimizers.

    megatron's version reads the state of its bf16 wrappers (``sd["optimizer"]``); an fp32
    wrapper's state dict is the torch optimizer's own (``state``, ``param_groups``). Same rules
    otherwise: every DP rank saves the state of its own weights (replica 0 along DP), empty
    containers are not saved, and a param group's metadata comes from a rank that has params in it.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    sharded = ChainedOptimizer.sharded_state_dict(optimizer, model_sharded_state_dict, is_loading, **kwargs)
    for base in nested_values(sharded):
        if hasattr(base, "replica_id"):
            base.replica_id = 0 if isinstance(base.replica_id, int) else (*base.replica_id[:2], 0)
    per_optimizer = {0: sharded} if len(optimizer.chained_optimizers) == 1 else sharded
    for sd in per_optimizer.values():
        if not sd["state"]:
            sd["state"] = LocalNonpersistentObject(sd["state"])
        for i, group in enumerate(sd["param_groups"]):
            local = group.pop("params")
            group["params"] = bool(local.unwrap())
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, group)
            chosen = next((g for g in everyone if g["params"]), group)
            chosen["params"] = local
            sd["param_groups"][i] = chosen
    return sharded
