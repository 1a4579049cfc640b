"""Declarative parameter mappings between megavl and Hugging Face checkpoints.

A mapping names megavl tensors (keys of ``VisionLanguageModel.state_dict()`` at
TP=1, ``*`` standing for a layer or expert index) and the Hugging Face tensors
they are made of, and knows how to turn one side into the other. Each kind of
transform is one small class; an architecture is a list of them (a
``MappingTable``). Most mappings relate one megavl tensor to one or more
Hugging Face tensors; ``StackedExperts`` relates many (one per expert) to one.

Everything here works on whole (TP=1) tensors. Splitting them over tensor or
pipeline ranks is left to megatron's dist_checkpointing, which reshards a
checkpoint to whatever layout loads it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from megavl.convert.errors import ConversionError


@dataclass(frozen=True)
class BoundMapping:
    """A mapping applied to concrete tensor names."""

    megavl: tuple[str, ...]
    hf: tuple[str, ...]
    mapping: "Mapping"

    def to_megavl(self, hf: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The megavl tensors (in self.megavl's order) from the Hugging Face ones (self.hf's order)."""
        return self.mapping.convert_to_megavl(list(hf))

    def to_hf(self, megavl: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.mapping.convert_to_hf(list(megavl))

    def hf_shapes(self, megavl_shapes: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        """Shapes the Hugging Face tensors must have for megavl tensors of these shapes.

        Runs the export transform on meta tensors, so shape rules live in one place.
        """
        meta = [torch.empty(tuple(s), device="meta") for s in megavl_shapes]
        return [tuple(t.shape) for t in self.to_hf(meta)]


class Mapping:
    """One megavl tensor <-> Hugging Face tensors; subclasses define the transform."""

    # '*'s at the end of the megavl pattern that the Hugging Face side does not
    # have because it stacks them into one tensor (see StackedExperts).
    stacked_wildcards = 0

    def __init__(self, megavl: str, *hf: str):
        for name in hf:
            if name.count("*") != megavl.count("*") - self.stacked_wildcards:
                raise ValueError(
                    f"mapping {megavl!r} -> {name!r}: the Hugging Face side must have "
                    f"{megavl.count('*') - self.stacked_wildcards} '*' (the same number of layer indices)"
                )
        self.megavl = megavl
        self.hf = tuple(hf)
        self._pattern = re.compile(re.escape(megavl).replace(r"\*", r"(\d+)") + "$")

    def match(self, name: str):
        """The indices '*' stands for in name, or None when name is not this mapping's."""
        m = self._pattern.match(name)
        return None if m is None else m.groups()

    def hf_names(self, indices: Sequence[str]) -> tuple[str, ...]:
        def fill(pattern: str) -> str:
            parts = pattern.split("*")
            return "".join(p + (indices[i] if i < len(indices) else "") for i, p in enumerate(parts))

        return tuple(fill(p) for p in self.hf)

    def bind(self, matches: Sequence[tuple[str, tuple]]) -> list[BoundMapping]:
        """BoundMappings for the (name, indices) pairs this mapping matched: one per name."""
        return [BoundMapping((name,), self.hf_names(indices), self) for name, indices in matches]

    def convert_to_megavl(self, hf: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.to_megavl(hf)]

    def convert_to_hf(self, megavl: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.to_hf(megavl[0])

    # The single-tensor transforms most subclasses define.
    def to_megavl(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.megavl!r} <- {', '.join(self.hf) or 'nothing'})"


class Direct(Mapping):
    """The same tensor on both sides; dist_checkpointing splits it for tensor parallelism
    (column- or row-parallel linear weights, embeddings, the output layer)."""

    def __init__(self, megavl: str, hf: str):
        super().__init__(megavl, hf)

    def to_megavl(self, hf):
        return hf[0]

    def to_hf(self, tensor):
        return [tensor]


class Replicated(Direct):
    """The same tensor on both sides, held whole by every tensor-parallel rank
    (norm weights and biases, biases of row-parallel linears)."""


class PatchEmbedConv3d(Direct):
    """The patch embedding: a Conv3d kernel [hidden, channels, T, P, P] on both sides
    (megavl applies it as a matmul, but stores the Conv3d layout)."""

    def to_megavl(self, hf):
        if hf[0].dim() != 5:
            raise ConversionError(
                f"{self.hf[0]}: expected a 5-D Conv3d kernel [hidden, channels, T, P, P], "
                f"got shape {tuple(hf[0].shape)}"
            )
        return hf[0]


class PatchEmbedConv2d(Direct):
    """A Conv2d patch kernel [hidden, channels, P, P] (SigLIP, CLIP) <-> megavl's Conv3d layout
    with one frame [hidden, channels, 1, P, P]."""

    def to_megavl(self, hf):
        if hf[0].dim() != 4:
            raise ConversionError(
                f"{self.hf[0]}: expected a 4-D Conv2d kernel [hidden, channels, P, P], got shape {tuple(hf[0].shape)}"
            )
        return hf[0].unsqueeze(2)

    def to_hf(self, tensor):
        return [tensor.squeeze(2)]


class PatchEmbedLinear(Direct):
    """A linear patch embedding over channel-last flattened patches [hidden, P * P * C] (SigLIP2's)
    <-> megavl's Conv3d layout with one frame [hidden, C, 1, P, P]."""

    def __init__(self, megavl: str, hf: str, patch_size: int, channels: int):
        super().__init__(megavl, hf)
        self.patch_size, self.channels = patch_size, channels

    def to_megavl(self, hf):
        p, c = self.patch_size, self.channels
        if hf[0].dim() != 2 or hf[0].shape[1] != p * p * c:
            raise ConversionError(f"{self.hf[0]}: expected a linear [hidden, {p} * {p} * {c}], got shape "
                                  f"{tuple(hf[0].shape)}")
        return hf[0].reshape(-1, p, p, c).permute(0, 3, 1, 2).unsqueeze(2).contiguous()

    def to_hf(self, tensor):
        return [tensor.squeeze(2).permute(0, 2, 3, 1).reshape(tensor.shape[0], -1).contiguous()]


class QKV(Mapping):
    """Separate q, k, v projections <-> megatron's fused linear_qkv.

    megatron interleaves per query group (GQA): for each of the `groups` key/value
    heads, the rows of its heads // groups query heads, then its key head, then its
    value head. Works for weights [out, in] and biases [out] alike.
    """

    def __init__(self, megavl: str, q: str, k: str, v: str, heads: int, groups: int):
        super().__init__(megavl, q, k, v)
        self._set_heads(heads, groups)

    def _set_heads(self, heads: int, groups: int) -> None:
        if heads % groups:
            raise ValueError(f"{self.megavl}: {heads} attention heads do not split into {groups} query groups")
        self.heads = heads
        self.groups = groups

    def to_megavl(self, hf):
        q, k, v = hf
        rest = q.shape[1:]
        head_dim = q.shape[0] // self.heads
        per_group = self.heads // self.groups
        q = q.reshape(self.groups, per_group * head_dim, *rest)
        k = k.reshape(self.groups, head_dim, *rest)
        v = v.reshape(self.groups, head_dim, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def to_hf(self, tensor):
        rest = tensor.shape[1:]
        per_group = self.heads // self.groups
        head_dim = tensor.shape[0] // (self.heads + 2 * self.groups)
        grouped = tensor.reshape(self.groups, (per_group + 2) * head_dim, *rest)
        q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class FusedQKV(QKV):
    """One Hugging Face tensor holding [all q heads; all k heads; all v heads]
    (the vision attention's qkv) <-> megatron's per-group interleaved linear_qkv."""

    def __init__(self, megavl: str, qkv: str, heads: int, groups: int):
        Mapping.__init__(self, megavl, qkv)
        self._set_heads(heads, groups)

    def _sizes(self, rows: int) -> list[int]:
        head_dim = rows // (self.heads + 2 * self.groups)
        return [self.heads * head_dim, self.groups * head_dim, self.groups * head_dim]

    def to_megavl(self, hf):
        (qkv,) = hf
        return super().to_megavl(torch.split(qkv, self._sizes(qkv.shape[0]), dim=0))

    def to_hf(self, tensor):
        return [torch.cat(super().to_hf(tensor), dim=0)]


class GatedMLP(Mapping):
    """Separate gate and up projections <-> megatron's gated fc1 = [gate; up]."""

    def __init__(self, megavl: str, gate: str, up: str):
        super().__init__(megavl, gate, up)

    def to_megavl(self, hf):
        return torch.cat(list(hf), dim=0)

    def to_hf(self, tensor):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate, up]


class StackedExperts(Mapping):
    """Per-expert megavl tensors <-> one Hugging Face tensor stacking every expert on dim 0.

    The megavl pattern's last '*' is the expert index; the Hugging Face pattern
    has one '*' fewer. transpose: the Hugging Face tensor holds each expert's
    matrix transposed ([experts, in, out], as Qwen3-VL-MoE saves its experts).
    """

    stacked_wildcards = 1

    def __init__(self, megavl: str, hf: str, transpose: bool = False):
        super().__init__(megavl, hf)
        self.transpose = transpose

    def bind(self, matches):
        layers: dict[tuple, dict[int, str]] = defaultdict(dict)
        for name, indices in matches:
            layers[indices[:-1]][int(indices[-1])] = name
        bound = []
        for outer, experts in layers.items():
            absent = sorted(set(range(max(experts) + 1)) - set(experts))
            if absent:
                raise ConversionError(f"{self.megavl}: no tensors for experts {absent} at indices {list(outer)}")
            names = tuple(experts[e] for e in range(len(experts)))
            bound.append(BoundMapping(names, self.hf_names(outer), self))
        return bound

    def _orient(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.transpose(-1, -2) if self.transpose else matrix

    def convert_to_megavl(self, hf):
        (stacked,) = hf
        return [self._orient(m) for m in stacked.unbind(0)]

    def convert_to_hf(self, megavl):
        return [torch.stack([self._orient(m) for m in megavl])]


class SharedLoRAInput(Mapping):
    """megavl's LoRA A of a fused linear <-> one identical copy per split part.

    megavl adapts the fused q/k/v (or gate/up) projection with one A; split into
    separate projections, each part gets that same A (and its rows of B), which
    computes exactly the same outputs.
    """

    def to_megavl(self, hf):
        for name, tensor in zip(self.hf[1:], hf[1:]):
            if not torch.equal(tensor, hf[0]):
                raise ConversionError(
                    f"{name} differs from {self.hf[0]}: megavl's adapter shares one LoRA A across the parts "
                    "of a fused projection, so these must be equal"
                )
        return hf[0]

    def to_hf(self, tensor):
        # Copies: the safetensors writer refuses tensors that share memory.
        return [tensor.clone() for _ in self.hf]


class MegavlOnly(Mapping):
    """A megavl tensor without a Hugging Face counterpart (e.g. vision-only LoRA adapters).

    Export leaves it out and import keeps the model's own initial value, which is
    only right while the tensor does not change the outputs; the architecture's
    export_problems decides when that holds.
    """

    def __init__(self, megavl: str):
        super().__init__(megavl)

    def convert_to_megavl(self, hf):
        return []

    def convert_to_hf(self, megavl):
        return []


class Fresh(Mapping):
    """Every megavl tensor under a prefix that starts from the model's own initial values (a
    projector created by a composed import): nothing is read, and nothing is exported."""

    def __init__(self, prefix: str):
        super().__init__(prefix)
        self.prefix = prefix

    def match(self, name: str):
        return () if name.startswith(self.prefix) else None

    def convert_to_megavl(self, hf):
        return []

    def convert_to_hf(self, megavl):
        return []


def rehomed(mappings: Sequence[Mapping], old: str, new: str) -> list[Mapping]:
    """Copies of mappings whose Hugging Face names starting with old start with new instead: the
    same tensors stored under another prefix (a text LM's ``model.`` inside a VLM's
    ``language_model.model.``)."""
    import copy

    moved = []
    for mapping in mappings:
        mapping = copy.copy(mapping)
        mapping.hf = tuple(new + name[len(old):] if name.startswith(old) else name for name in mapping.hf)
        moved.append(mapping)
    return moved


@dataclass
class MappingTable:
    """The mappings of one architecture, plus Hugging Face tensors that may be
    present but carry nothing megavl needs (e.g. lm_head.weight of a tied model)."""

    mappings: list[Mapping]
    ignorable_hf: tuple[str, ...] = field(default_factory=tuple)

    def bind(self, megavl_names: Iterable[str]) -> list[BoundMapping]:
        """BoundMappings covering every megavl name; each must match exactly one mapping."""
        names = list(megavl_names)
        matched: dict[int, list] = defaultdict(list)
        unmapped, ambiguous = [], []
        for name in names:
            hits = [(i, idx) for i, m in enumerate(self.mappings) if (idx := m.match(name)) is not None]
            if not hits:
                unmapped.append(name)
            elif len(hits) > 1:
                ambiguous.append(f"{name} ({', '.join(repr(self.mappings[i]) for i, _ in hits)})")
            else:
                i, indices = hits[0]
                matched[i].append((name, indices))
        if unmapped or ambiguous:
            lines = [f"  no mapping for megavl tensor {n}" for n in unmapped]
            lines += [f"  several mappings for megavl tensor {a}" for a in ambiguous]
            raise ConversionError(
                "the model has tensors this architecture's mapping table does not cover "
                "(a model feature the Hugging Face architecture lacks?):\n" + "\n".join(lines)
            )
        bound = [b for i in sorted(matched) for b in self.mappings[i].bind(matched[i])]
        # In the model's order, so exported shards hold whole layers, as Hugging Face's do.
        position = {name: i for i, name in enumerate(names)}
        return sorted(bound, key=lambda b: position[b.megavl[0]])

    def is_ignorable(self, hf_name: str) -> bool:
        return hf_name in self.ignorable_hf
