"""Tests for megavl.attention.mask.

The reference below re-implements the masking rule with plain loops, written
from the rule's prose rather than from the mask_mod, so a shared mistake in
vectorised thinking cannot hide in both.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from megavl.attention.mask import (
    block_mask,
    build_vlm_dense_mask,
    dense_mask,
    segment_mask_mod,
    vlm_mask_mod,
)

TEXT = -1  # image id of a text token
PAD = -1  # document id of a padding token


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def reference_mask(
    document_ids: torch.Tensor,
    image_ids: torch.Tensor,
    turn_ids: torch.Tensor,
    bidirectional_images: bool,
) -> torch.Tensor:
    """Brute-force the rule over every (b, q, k); returns bool [B, 1, S, S]."""
    docs, imgs, turns = document_ids.tolist(), image_ids.tolist(), turn_ids.tolist()
    batch, seq_len = document_ids.shape
    out = [[[False] * seq_len for _ in range(seq_len)] for _ in range(batch)]
    for b in range(batch):
        for q in range(seq_len):
            for k in range(seq_len):
                if docs[b][q] == PAD:
                    out[b][q][k] = q == k
                    continue
                same_document = docs[b][q] == docs[b][k]
                turn_visible = turns[b][k] == 0 or turns[b][k] == turns[b][q]
                both_images = imgs[b][q] >= 0 and imgs[b][k] >= 0
                ordered = k <= q or (bidirectional_images and both_images)
                out[b][q][k] = same_document and turn_visible and ordered
    return torch.tensor(out, dtype=torch.bool).unsqueeze(1)


def ids(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def random_document(
    rng: random.Random, conversation_masking: bool, span: int = 1
) -> list[tuple[int, int]]:
    """One example as a list of (image_id, turn_id) per token.

    Shape: optional shared context (text and 0-2 images, possibly back to back),
    then 1-3 QA turns that may each carry an image. ``span`` scales the length
    of every text/image run.
    """
    tokens: list[tuple[int, int]] = []
    next_image = 0

    def add_text(turn: int) -> None:
        tokens.extend([(TEXT, turn)] * rng.randint(1, 3 * span))

    def add_image(turn: int) -> None:
        nonlocal next_image
        tokens.extend([(next_image, turn)] * rng.randint(1, 4 * span))
        next_image += 1

    if rng.random() < 0.7:
        add_text(0)
    for _ in range(rng.randint(0, 2)):
        add_image(0)
    for turn in range(1, rng.randint(1, 3) + 1):
        turn_id = turn if conversation_masking else 0
        if rng.random() < 0.4:
            add_image(turn_id)
        add_text(turn_id)  # question
        add_text(turn_id)  # answer
    return tokens


def random_layout(
    rng: random.Random, batch: int, seq_len: int, span: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack random documents into each row, truncate, then pad at the end."""
    docs, imgs, turns = [], [], []
    for _ in range(batch):
        doc_row: list[int] = []
        img_row: list[int] = []
        turn_row: list[int] = []
        for doc in range(rng.randint(1, 4)):
            for image_id, turn_id in random_document(rng, rng.random() < 0.5, span):
                doc_row.append(doc)
                img_row.append(image_id)
                turn_row.append(turn_id)
        keep = min(len(doc_row), seq_len - rng.randint(0, seq_len // 4))
        n_pad = seq_len - keep
        docs.append(doc_row[:keep] + [PAD] * n_pad)
        imgs.append(img_row[:keep] + [TEXT] * n_pad)
        turns.append(turn_row[:keep] + [0] * n_pad)
    return ids(docs), ids(imgs), ids(turns)


def assert_masks_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == torch.bool
    if not torch.equal(actual, expected):
        b, _, q, k = (actual != expected).nonzero()[0].tolist()
        raise AssertionError(
            f"first mismatch at b={b} q={q} k={k}: "
            f"got {bool(actual[b, 0, q, k])}, expected {bool(expected[b, 0, q, k])}"
        )


# --------------------------------------------------------------------------- #
# Randomised comparison with the brute-force reference
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bidirectional_images", [True, False])
def test_matches_reference_on_random_packed_layouts(bidirectional_images: bool) -> None:
    rng = random.Random(1234 + bidirectional_images)
    saw_conversation = saw_padding = saw_multi_doc = saw_multi_image = False
    for _ in range(40):
        document_ids, image_ids, turn_ids = random_layout(rng, batch=3, seq_len=40)
        expected = reference_mask(document_ids, image_ids, turn_ids, bidirectional_images)
        actual = build_vlm_dense_mask(document_ids, image_ids, turn_ids, bidirectional_images)
        assert_masks_equal(actual, expected)

        saw_conversation |= bool((turn_ids >= 2).any())
        saw_padding |= bool((document_ids == PAD).any())
        saw_multi_doc |= bool((document_ids >= 1).any())
        saw_multi_image |= bool((image_ids >= 1).any())
    # Guard against a generator change silently dropping a feature under test.
    assert saw_conversation and saw_padding and saw_multi_doc and saw_multi_image


def test_every_real_row_sees_itself() -> None:
    """The diagonal is always allowed, so no softmax row is ever empty."""
    rng = random.Random(7)
    for _ in range(10):
        mask = build_vlm_dense_mask(*random_layout(rng, batch=2, seq_len=64))
        assert bool(mask[:, 0].diagonal(dim1=-2, dim2=-1).all())


# --------------------------------------------------------------------------- #
# Hand-checked cases
# --------------------------------------------------------------------------- #


def test_text_after_image_sees_whole_image() -> None:
    # t  i  i  i  t  t
    document_ids = ids([[0, 0, 0, 0, 0, 0]])
    image_ids = ids([[TEXT, 0, 0, 0, TEXT, TEXT]])
    turn_ids = torch.zeros_like(document_ids)
    mask = build_vlm_dense_mask(document_ids, image_ids, turn_ids)[0, 0]

    assert mask[4, :5].all()  # all earlier tokens incl. the full image
    assert not mask[4, 5]  # text stays causal
    assert mask[1, 3]  # first image token sees the last one of its image
    assert not mask[1, 4]  # image tokens do not see later text


def test_image_sees_later_image_only_when_bidirectional() -> None:
    # i0 i0 t  i1 i1 t
    document_ids = ids([[0, 0, 0, 0, 0, 0]])
    image_ids = ids([[0, 0, TEXT, 1, 1, TEXT]])
    turn_ids = torch.zeros_like(document_ids)

    bidirectional = build_vlm_dense_mask(document_ids, image_ids, turn_ids, True)[0, 0]
    assert bidirectional[0, 3] and bidirectional[0, 4]
    assert not bidirectional[0, 2]  # the text in between is still in the future

    causal = build_vlm_dense_mask(document_ids, image_ids, turn_ids, False)[0, 0]
    assert not causal[0, 3] and not causal[0, 4]
    assert not causal[0, 1]  # causal mode is causal within an image too
    assert causal[4, 0] and causal[4, 3]


def test_documents_never_see_each_other() -> None:
    # doc0: t i i t | doc1: i i t
    document_ids = ids([[0, 0, 0, 0, 1, 1, 1]])
    image_ids = ids([[TEXT, 0, 0, TEXT, 0, 0, TEXT]])
    turn_ids = torch.zeros_like(document_ids)
    for bidirectional in (True, False):
        mask = build_vlm_dense_mask(document_ids, image_ids, turn_ids, bidirectional)[0, 0]
        assert not mask[4:, :4].any()  # later document cannot look back
        assert not mask[:4, 4:].any()  # earlier images cannot look ahead
        assert mask[6, 4:].all()


def test_conversation_masking_hides_other_turns_but_not_shared_context() -> None:
    # turn: 0  0  0  1  1  2  2  2  2
    # kind: t  i  i  t  t  i  i  t  t
    document_ids = ids([[0] * 9])
    image_ids = ids([[TEXT, 0, 0, TEXT, TEXT, 1, 1, TEXT, TEXT]])
    turn_ids = ids([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    mask = build_vlm_dense_mask(document_ids, image_ids, turn_ids)[0, 0]

    turn2_text = 8
    assert mask[turn2_text, :3].all()  # shared context visible
    assert not mask[turn2_text, 3:5].any()  # turn 1 hidden
    assert mask[turn2_text, 5:9].all()  # own turn visible
    assert mask[5, 1] and mask[5, 2]  # turn-2 image sees the context image
    assert not mask[1, 5] and not mask[1, 6]  # context image must not see a turn's image
    assert mask[4, :5].all() and not mask[4, 5:].any()  # turn 1 is unaffected by turn 2


def test_conversation_masking_off_means_all_turns_zero() -> None:
    """Same tokens, turns all 0: the later question sees the earlier QA."""
    document_ids = ids([[0] * 5])
    image_ids = ids([[TEXT] * 5])
    mask = build_vlm_dense_mask(document_ids, image_ids, torch.zeros_like(document_ids))
    assert_masks_equal(mask, torch.ones(5, 5, dtype=torch.bool).tril()[None, None])


def test_padding_rows_and_columns() -> None:
    document_ids = ids([[0, 0, 0, PAD, PAD], [0, 1, PAD, PAD, PAD]])
    image_ids = ids([[0, 0, TEXT, TEXT, TEXT], [0, 0, TEXT, TEXT, TEXT]])
    turn_ids = torch.zeros_like(document_ids)
    for bidirectional in (True, False):
        mask = build_vlm_dense_mask(document_ids, image_ids, turn_ids, bidirectional)[:, 0]
        for b in range(2):
            for q in (document_ids[b] == PAD).nonzero().flatten().tolist():
                row = mask[b, q]
                assert int(row.sum()) == 1 and row[q]
                column = mask[b, :, q]
                assert int(column.sum()) == 1 and column[q]


def test_padding_image_ids_cannot_leak_bidirectional_attention() -> None:
    """Even if padding is mislabelled as vision, the padding rule wins."""
    document_ids = ids([[0, 0, PAD, PAD]])
    image_ids = ids([[0, 0, 0, 0]])
    mask = build_vlm_dense_mask(document_ids, image_ids, torch.zeros_like(document_ids))[0, 0]
    expected = torch.tensor(
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)


# --------------------------------------------------------------------------- #
# Segment mask (vision encoder)
# --------------------------------------------------------------------------- #


def test_segment_mask_matches_outer_equality() -> None:
    generator = torch.Generator().manual_seed(0)
    # Sorted so segments are contiguous spans, as for packed images/windows.
    segment_ids = torch.randint(0, 6, (3, 50), generator=generator).sort(dim=-1).values
    mask = dense_mask(segment_mask_mod(segment_ids), batch=3, seq_len=50)
    expected = (segment_ids[:, :, None] == segment_ids[:, None, :]).unsqueeze(1)
    assert_masks_equal(mask, expected)


def test_segment_mask_is_not_causal() -> None:
    segment_ids = ids([[0, 0, 0, 1, 1]])
    mask = dense_mask(segment_mask_mod(segment_ids), batch=1, seq_len=5)[0, 0]
    assert mask[0, 2] and mask[3, 4] and not mask[0, 3]


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def _good_ids() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    document_ids = ids([[0, 0, 0, PAD]])
    return document_ids, ids([[TEXT, 0, 0, TEXT]]), torch.zeros_like(document_ids)


@pytest.mark.parametrize(
    ("position", "bad", "pattern"),
    [
        (
            0,
            torch.zeros(4, dtype=torch.long),
            r"document_ids must be 2-D \[B, S\], got shape \(4,\)",
        ),
        (1, torch.zeros(1, 4), r"image_ids must have an integer dtype.*float32"),
        (2, torch.zeros(1, 4, dtype=torch.bool), r"turn_ids must have an integer dtype.*bool"),
        (
            1,
            torch.zeros(1, 5, dtype=torch.long),
            r"image_ids has shape \(1, 5\) but document_ids has shape \(1, 4\)",
        ),
        (0, ids([[0, -2, 0, 0]]), r"document_ids contains -2.*>= -1"),
        (1, ids([[0, -3, 0, 0]]), r"image_ids contains -3.*>= -1"),
        (2, ids([[0, -1, 0, 0]]), r"turn_ids contains -1.*>= 0"),
        (0, [[0, 0, 0, 0]], r"document_ids must be a torch.Tensor"),
    ],
)
def test_invalid_ids_raise_clear_errors(position: int, bad: object, pattern: str) -> None:
    args: list[object] = list(_good_ids())
    args[position] = bad
    with pytest.raises(ValueError, match=pattern):
        vlm_mask_mod(*args)  # type: ignore[arg-type]


def test_empty_ids_rejected() -> None:
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"document_ids must be non-empty.*\(1, 0\)"):
        vlm_mask_mod(empty, empty, empty)


def test_segment_ids_validated() -> None:
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype"):
        segment_mask_mod(torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_sizes_rejected(bad: object) -> None:
    mask_mod = segment_mask_mod(ids([[0, 0]]))
    with pytest.raises(ValueError, match="seq_len must be a positive int"):
        dense_mask(mask_mod, batch=1, seq_len=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Block mask + flex_attention agree with dense mask + SDPA
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bidirectional_images", [True, False])
def test_flex_attention_with_block_mask_matches_sdpa(bidirectional_images: bool) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, seq_len, head_dim = 2, 2, 320, 16  # 320: several blocks, ragged tail
    # Row 0: one long document without conversation masking, which gives full
    # blocks (the kernel skips mask_mod there). Row 1: random packing with long
    # runs, which gives empty and partial blocks.
    handmade = (
        ids([[0] * 310 + [PAD] * 10]),
        ids([[TEXT] * 100 + [0] * 60 + [TEXT] * 150 + [TEXT] * 10]),
        torch.zeros(1, seq_len, dtype=torch.long),
    )
    packed = random_layout(random.Random(99), 1, seq_len, span=12)
    document_ids, image_ids, turn_ids = (torch.cat(pair) for pair in zip(handmade, packed))
    mask_mod = vlm_mask_mod(document_ids, image_ids, turn_ids, bidirectional_images)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, seq_len, head_dim, generator=generator) for _ in range(3)
    )
    expected = F.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(mask_mod, batch, seq_len)
    )
    try:
        blocks = block_mask(mask_mod, batch, seq_len)
        with warnings.catch_warnings():
            # Eager flex_attention warns that it is unfused; that is the point here.
            warnings.simplefilter("ignore")
            actual = flex_attention(q, k, v, block_mask=blocks)
    except (NotImplementedError, RuntimeError) as error:  # pragma: no cover
        pytest.skip(
            f"flex_attention/BlockMask unavailable on CPU in torch {torch.__version__}: {error}"
        )
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert int(blocks.full_kv_num_blocks.sum()) > 0, "layout no longer produces full blocks"
