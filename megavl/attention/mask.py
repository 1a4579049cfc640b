"""Attention masks for packed vision-language sequences.

The masking rule is defined exactly once, as a FlexAttention ``mask_mod``
(``mask_mod(b, h, q_idx, kv_idx) -> bool``), and then materialised in the form
each backend needs:

* :func:`dense_mask` -- a boolean ``[B, 1, S, S]`` tensor for
  ``torch.nn.functional.scaled_dot_product_attention`` (the CPU path);
* :func:`block_mask` -- a :class:`BlockMask` for compiled ``flex_attention``
  (the CUDA path), which skips fully masked tiles instead of computing them.

Keeping one definition means the CPU reference path and the fast GPU path can
never disagree about who sees whom.

Per-token id tensors (all ``LongTensor [B, S]``):

* ``document_ids`` -- packed example a token belongs to; ``-1`` marks padding.
* ``image_ids`` -- ``-1`` for text, otherwise the index of the image the
  (image-pad) token belongs to.
* ``turn_ids`` -- ``0`` for context shared by all turns (system prompt, the
  prompt before the first QA, ...), ``k >= 1`` for QA turn ``k``. Examples
  without conversation masking carry ``0`` everywhere, which makes the turn
  condition a no-op for them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

__all__ = [
    "PAD_DOCUMENT_ID",
    "TEXT_IMAGE_ID",
    "SHARED_TURN_ID",
    "MaskMod",
    "vlm_mask_mod",
    "segment_mask_mod",
    "dense_mask",
    "block_mask",
    "build_vlm_dense_mask",
    "materialize",
    "materialize_rows",
]

PAD_DOCUMENT_ID = -1
TEXT_IMAGE_ID = -1
SHARED_TURN_ID = 0

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# The id tensors a mask_mod closes over live on one device; materialising the
# mask anywhere else would fail inside the indexing, far from the cause. The
# constructors below record that device on the returned function so the
# materialisers can default to it.
_DEVICE_ATTR = "_megavl_device"


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _check_id_tensor(name: str, ids: object) -> None:
    """Reject anything that is not a 2-D integer tensor ``[B, S]``.

    Bool is excluded on purpose: it is technically integral but a bool id
    tensor is almost certainly a mask passed in the wrong place.
    """
    if not isinstance(ids, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape [B, S], got {type(ids).__name__}"
        )
    if ids.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [B, S], got shape {tuple(ids.shape)}"
        )
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(
            f"{name} must be non-empty [B, S] with B >= 1 and S >= 1, "
            f"got shape {tuple(ids.shape)}"
        )
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError(
            f"{name} must have an integer dtype (e.g. torch.long), got {ids.dtype}"
        )


def _check_same_layout(named: dict[str, Tensor]) -> None:
    """All id tensors describe the same tokens, so shape and device must match."""
    (first_name, first), *rest = named.items()
    for name, ids in rest:
        if ids.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(ids.shape)} but {first_name} has shape "
                f"{tuple(first.shape)}; all id tensors must have the same shape [B, S]"
            )
        if ids.device != first.device:
            raise ValueError(
                f"{name} is on {ids.device} but {first_name} is on {first.device}; "
                "all id tensors must be on the same device"
            )


def _check_min(name: str, ids: Tensor, minimum: int, meaning: str) -> None:
    """Catch out-of-range ids; a stray -2 would otherwise be silently misread."""
    smallest = int(ids.min())
    if smallest < minimum:
        raise ValueError(
            f"{name} contains {smallest}, but valid values are >= {minimum} ({meaning})"
        )


def _validate_vlm_ids(document_ids: Tensor, image_ids: Tensor, turn_ids: Tensor) -> None:
    """Validate the language-model id tensors before any mask is built from them."""
    named = {"document_ids": document_ids, "image_ids": image_ids, "turn_ids": turn_ids}
    for name, ids in named.items():
        _check_id_tensor(name, ids)
    _check_same_layout(named)
    # Reading the values of ids on an accelerator would cost a host sync per tensor in every
    # microbatch; there models.inputs.to_device checks the host copies (check_id_values) before
    # moving them, and the checks here are the free ones.
    if document_ids.device.type == "cpu":
        check_id_values(document_ids, image_ids, turn_ids)


def check_id_values(document_ids: Tensor, image_ids: Tensor, turn_ids: Tensor) -> None:
    """ValueError naming the tensor when an id is below its sentinel."""
    _check_min("document_ids", document_ids, PAD_DOCUMENT_ID, "-1 = padding, >= 0 = document index")
    _check_min("image_ids", image_ids, TEXT_IMAGE_ID, "-1 = text, >= 0 = image index")
    _check_min("turn_ids", turn_ids, SHARED_TURN_ID, "0 = shared context, >= 1 = QA turn")


def _check_size(name: str, value: object) -> None:
    """Sizes come from user code; a float or bool here usually means a mix-up."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- #
# Mask definitions (the single source of truth)
# --------------------------------------------------------------------------- #


def vlm_mask_mod(
    document_ids: Tensor,
    image_ids: Tensor,
    turn_ids: Tensor,
    bidirectional_images: bool = True,
) -> MaskMod:
    """Return the language-model ``mask_mod`` for a packed VLM batch.

    Query ``q`` may attend key ``k`` iff all of:

    * same document, and that document is not padding;
    * the key's turn is visible: ``turn[k] == 0`` or ``turn[k] == turn[q]``;
    * ``k <= q`` (causal), or -- when ``bidirectional_images`` -- both tokens
      are vision tokens. Image tokens therefore see every image token of their
      document (including later images), while text stays causal.

    Padding tokens attend only to themselves: a fully masked row would make
    softmax produce NaN, and nothing else may attend to padding.

    The returned function uses only tensor indexing and elementwise ops, so it
    works under the vmap of ``create_mask`` / ``create_block_mask``, under
    ``torch.compile`` and on plain broadcast index tensors alike.
    """
    _validate_vlm_ids(document_ids, image_ids, turn_ids)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        doc_q = document_ids[b, q_idx]
        doc_k = document_ids[b, kv_idx]
        turn_q = turn_ids[b, q_idx]
        turn_k = turn_ids[b, kv_idx]

        same_document = (doc_q == doc_k) & (doc_q != PAD_DOCUMENT_ID)
        turn_visible = (turn_k == SHARED_TURN_ID) | (turn_k == turn_q)
        order_ok = kv_idx <= q_idx
        # Decided at construction time, not on tensor values, to stay vmap-safe
        # and to let the causal variant skip two gathers entirely.
        if bidirectional_images:
            both_vision = (image_ids[b, q_idx] != TEXT_IMAGE_ID) & (
                image_ids[b, kv_idx] != TEXT_IMAGE_ID
            )
            order_ok = order_ok | both_vision

        allowed = same_document & turn_visible & order_ok
        padding_self = (doc_q == PAD_DOCUMENT_ID) & (q_idx == kv_idx)
        return allowed | padding_self

    setattr(mask_mod, _DEVICE_ATTR, document_ids.device)
    return mask_mod


def segment_mask_mod(segment_ids: Tensor) -> MaskMod:
    """Return a non-causal ``mask_mod``: ``q`` attends ``k`` iff same segment.

    Used by the vision encoder, whose input is a packed sequence of image
    patches: segments are whole images for global attention, or windows for
    windowed attention. Padding needs no special case as long as it forms its
    own segment (every row then has at least its diagonal).
    """
    _check_id_tensor("segment_ids", segment_ids)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return segment_ids[b, q_idx] == segment_ids[b, kv_idx]

    setattr(mask_mod, _DEVICE_ATTR, segment_ids.device)
    return mask_mod


# --------------------------------------------------------------------------- #
# Materialisation
# --------------------------------------------------------------------------- #


def _resolve_device(mask_mod: MaskMod, device: torch.device | str | None) -> torch.device:
    """Default to where the mask_mod's id tensors live, else CPU.

    torch's own default (the current accelerator) would mismatch CPU id
    tensors, so it is deliberately not used.
    """
    if device is not None:
        return torch.device(device)
    return getattr(mask_mod, _DEVICE_ATTR, torch.device("cpu"))


def dense_mask(
    mask_mod: MaskMod,
    batch: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Materialise ``mask_mod`` as a bool ``[batch, 1, seq_len, seq_len]`` tensor.

    ``True`` means "may attend", which is SDPA's convention for boolean
    masks. The head dimension is 1 because the rules never depend on the head
    and SDPA broadcasts it. Memory is ``batch * seq_len**2`` bytes, so this is
    meant for the CPU path and for tests, not for long GPU sequences.

    ``device`` defaults to the device of the tensors the mask_mod was built
    from (CPU for foreign mask_mods).
    """
    _check_size("batch", batch)
    _check_size("seq_len", seq_len)
    return create_mask(
        mask_mod, batch, 1, seq_len, seq_len, device=_resolve_device(mask_mod, device)
    )


def block_mask(
    mask_mod: MaskMod,
    batch: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> BlockMask:
    """Build a :class:`BlockMask` for ``flex_attention`` from ``mask_mod``.

    This is the production path on CUDA together with a compiled
    ``flex_attention``: tiles that are fully masked (other documents, the
    future of causal text) are skipped rather than computed. ``H=None``
    shares one mask across heads, as the rules never depend on the head.

    On CPU it works, but only as a correctness check for tests: uncompiled
    flex_attention on CPU is a slow reference implementation, and SDPA with
    :func:`dense_mask` is the CPU path.

    ``device`` defaults to the device of the tensors the mask_mod was built
    from (CPU for foreign mask_mods).
    """
    _check_size("batch", batch)
    _check_size("seq_len", seq_len)
    return create_block_mask(
        mask_mod, batch, None, seq_len, seq_len, device=_resolve_device(mask_mod, device)
    )


def build_vlm_dense_mask(
    document_ids: Tensor,
    image_ids: Tensor,
    turn_ids: Tensor,
    bidirectional_images: bool = True,
) -> Tensor:
    """Dense bool ``[B, 1, S, S]`` language-model mask straight from the id tensors.

    Convenience for the CPU/SDPA path so callers need not repeat the shape.
    """
    mask_mod = vlm_mask_mod(document_ids, image_ids, turn_ids, bidirectional_images)
    batch, seq_len = document_ids.shape
    return dense_mask(mask_mod, batch, seq_len, device=document_ids.device)


def materialize(mask_mod: MaskMod, batch: int, seq_len: int, backend: str):
    """The mask in the form an attention back end takes: 'sdpa' -> dense, 'flex' -> BlockMask."""
    if backend == "sdpa":
        return dense_mask(mask_mod, batch, seq_len)
    if backend == "flex":
        return block_mask(mask_mod, batch, seq_len)
    raise ValueError(f"attention backend {backend!r} is not one of ['flex', 'sdpa']")


def materialize_rows(mask_mod: MaskMod, batch: int, query_start: int, query_len: int, kv_len: int, backend: str):
    """The rows ``query_start .. query_start + query_len`` of the mask against keys ``0 .. kv_len``,
    in the back end's form: a step of generation with a KV cache attends from its new tokens
    to every cached one, by the same rule as training."""
    for name, value in (("batch", batch), ("query_len", query_len), ("kv_len", kv_len)):
        _check_size(name, value)
    if isinstance(query_start, bool) or not isinstance(query_start, int) or query_start < 0:
        raise ValueError(f"query_start must be a non-negative int, got {query_start!r}")
    device = _resolve_device(mask_mod, None)

    def rows(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return mask_mod(b, h, q_idx + query_start, kv_idx)

    if backend == "sdpa":
        return create_mask(rows, batch, 1, query_len, kv_len, device=device)
    if backend == "flex":
        return create_block_mask(rows, batch, None, query_len, kv_len, device=device)
    raise ValueError(f"attention backend {backend!r} is not one of ['flex', 'sdpa']")
