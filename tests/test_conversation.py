"""SampleEncoder: chat layout, answer-only labels, image token counts and turn ids."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_tokenizer
from megavl.config import Config
from megavl.data.batch import IGNORE_INDEX, ImagePatches
from megavl.data.conversation import SampleEncoder

CORPUS = [
    "You are a helpful assistant.", "system\n", "user\n", "assistant\n",
    "What is in the picture? Describe the image.", "A red square on a blue mat.",
    "Where is the cat? The cat is at (12,34),(56,78).", "Answer briefly.",
]


def build_tokenizer():
    return tiny_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_config(mask_prob: float = 0.0, grounding_prob: float = 0.0) -> Config:
    config = Config()
    config.data.conversation_mask_prob = mask_prob
    config.data.grounding_conversation_mask_prob = grounding_prob
    return config


def fake_image(h: int, w: int) -> ImagePatches:
    """An image of h x w patches (contents do not matter to the encoder)."""
    return ImagePatches(torch.zeros(h * w, 3 * 2 * 14 * 14), (1, h, w))


def ids(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


ANSWER_1 = "A red square on a blue mat."
ANSWER_2 = "The cat is at <|box_start|>(12,34),(56,78)<|box_end|>."


def two_turn_record(**extra) -> dict:
    return {
        "id": "rec-1",
        "task": "vqa",
        "language": "en",
        "grounding": False,
        "conversations": [
            {"role": "user", "content": "<image>\nWhat is in the picture? <image>"},
            {"role": "assistant", "content": ANSWER_1},
            {"role": "user", "content": "Where is the cat?"},
            {"role": "assistant", "content": ANSWER_2},
        ],
        **extra,
    }


def test_chat_layout_and_answer_only_labels(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(), seed=0)
    sample = encoder.encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    assert sample.key == "rec-1"
    assert len(sample.tokens) == len(sample.labels) == len(sample.turn_ids)

    text = tokenizer.decode(sample.tokens)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>\nWhat is in the picture? "
        "<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|><|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER_1}<|im_end|>\n"
        "<|im_start|>user\nWhere is the cat?<|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER_2}<|im_end|>\n"
    )
    assert text == expected

    # labels[i] is the target at position i, i.e. tokens[i + 1] when that is an answer token.
    trained = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    assert all(sample.labels[i] == sample.tokens[i + 1] for i in trained)
    im_end = ids(tokenizer, "<|im_end|>")
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert [sample.labels[i] for i in trained] == encode(ANSWER_1) + [im_end] + encode(ANSWER_2) + [im_end]
    # Grounding markup is one special token each, and is trained.
    assert ids(tokenizer, "<|box_start|>") in [sample.labels[i] for i in trained]
    # Targets are contiguous within each answer: nothing else slips in.
    first, second = encode(ANSWER_1), encode(ANSWER_2)
    runs = []
    for i in trained:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert [len(r) for r in runs] == [len(first) + 1, len(second) + 1]
    assert sample.labels[-1] == IGNORE_INDEX


def test_image_pad_count_matches_grid(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(), seed=0)
    images = [fake_image(4, 4), fake_image(6, 8), fake_image(2, 10)]
    record = {
        "id": "imgs",
        "conversations": [
            {"role": "user", "content": "<image><image> Describe the image. <image>"},
            {"role": "assistant", "content": "Answer briefly."},
        ],
    }
    sample = encoder.encode(record, images)
    start, end, pad = (ids(tokenizer, t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"))
    spans = []
    for i, token in enumerate(sample.tokens):
        if token == start:
            j = sample.tokens.index(end, i)
            assert set(sample.tokens[i + 1 : j]) == {pad}
            spans.append(j - i - 1)
    assert spans == [image.num_tokens(2) for image in images] == [4, 12, 5]
    assert sample.images == images


def _message_turns(tokenizer, sample) -> list[tuple[set[int], set[int]]]:
    """Per message block (from <|im_start|> to the next): (turn ids of text tokens, of vision tokens)."""
    start = ids(tokenizer, "<|im_start|>")
    vstart, vend = ids(tokenizer, "<|vision_start|>"), ids(tokenizer, "<|vision_end|>")
    starts = [i for i, t in enumerate(sample.tokens) if t == start] + [len(sample.tokens)]
    blocks = []
    for a, b in zip(starts, starts[1:]):
        text, vision, inside = set(), set(), False
        for i in range(a, b):
            token = sample.tokens[i]
            if token == vstart:
                inside = True
            (vision if inside else text).add(sample.turn_ids[i])
            if token == vend:
                inside = False
        blocks.append((text, vision))
    return blocks


def test_turn_ids_with_conversation_masking(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(mask_prob=1.0), seed=0)
    sample = encoder.encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    blocks = _message_turns(tokenizer, sample)
    # system, user 1, assistant 1, user 2, assistant 2
    assert [text for text, _ in blocks] == [{0}, {1}, {1}, {2}, {2}]
    assert blocks[1][1] == {0}  # the images stay visible to every turn
    assert [vision for _, vision in blocks if vision] == [{0}]


def test_turn_ids_without_conversation_masking(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(mask_prob=0.0), seed=0)
    sample = encoder.encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    assert set(sample.turn_ids) == {0}


def test_grounding_records_use_their_own_probability(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(mask_prob=0.0, grounding_prob=1.0), seed=0)
    images = [fake_image(4, 4), fake_image(6, 8)]
    assert set(encoder.encode(two_turn_record(grounding=True), images).turn_ids) == {0, 1, 2}
    assert set(encoder.encode(two_turn_record(grounding=False), images).turn_ids) == {0}


def test_masking_decision_is_deterministic_per_record(tokenizer):
    config = make_config(mask_prob=0.5)
    records = [{"id": f"r{i}", "grounding": False} for i in range(60)]
    a = SampleEncoder(tokenizer, config, seed=7)
    b = SampleEncoder(tokenizer, config, seed=7)
    forward = {r["id"]: a.uses_conversation_mask(r) for r in records}
    backward = {r["id"]: b.uses_conversation_mask(r) for r in reversed(records)}
    assert forward == backward
    assert 10 < sum(forward.values()) < 50
    other_seed = SampleEncoder(tokenizer, config, seed=8)
    assert forward != {r["id"]: other_seed.uses_conversation_mask(r) for r in records}


def test_custom_system_prompt(tokenizer):
    encoder = SampleEncoder(tokenizer, make_config(), seed=0)
    record = {
        "id": "sys",
        "conversations": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Where is the cat?"},
            {"role": "assistant", "content": "On a mat."},
        ],
    }
    text = tokenizer.decode(encoder.encode(record, []).tokens)
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize(
    "conversations, images, message",
    [
        ([{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "ok"}], 0, "placeholders but 0 images"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], 1, "placeholders but 1 images"),
        ([{"role": "user", "content": "hi"}], 0, "no assistant message"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], 0, "empty assistant answer"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok"}], 0, "unknown role 'robot'"),
        ([{"role": "user", "content": "hi <|image_pad|>"}, {"role": "assistant", "content": "ok"}], 0, "special tokens"),
        ([], 0, "non-empty list"),
    ],
)
def test_invalid_records_are_rejected_with_their_id(tokenizer, conversations, images, message):
    encoder = SampleEncoder(tokenizer, make_config(), seed=0)
    record = {"id": "bad-7", "conversations": conversations}
    with pytest.raises(ValueError, match=message) as error:
        encoder.encode(record, [fake_image(4, 4)] * images)
    assert "'bad-7'" in str(error.value)


def test_tokenizer_must_agree_with_model_image_token(tokenizer):
    config = make_config()
    config.model.lm.image_token_id = 5
    with pytest.raises(ValueError, match="image_token_id"):
        SampleEncoder(tokenizer, config, seed=0)


def test_all_text_loss_scope_trains_every_token_after_the_system_prompt_but_the_images(tokenizer):
    config = make_config()
    answers = SampleEncoder(tokenizer, config, seed=0).encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    config.train.loss_scope = "all_text"
    sample = SampleEncoder(tokenizer, config, seed=0).encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    assert sample.tokens == answers.tokens

    im_end = ids(tokenizer, "<|im_end|>")
    system_end = sample.tokens.index(im_end) + 1  # the newline after the system block's <|im_end|>
    image_span = {ids(tokenizer, t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")}
    # Position i is trained when tokens[i + 1] is a target.
    expected = [i for i in range(len(sample.tokens) - 1)
                if i + 1 > system_end and sample.tokens[i + 1] not in image_span]
    trained = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    assert trained == expected
    assert all(sample.labels[i] == sample.tokens[i + 1] for i in trained)
    # Role headers and questions now count; every answer target still does.
    answer_targets = {i for i, label in enumerate(answers.labels) if label != IGNORE_INDEX}
    assert answer_targets < set(trained)
    assert len(trained) - len(answer_targets) > 20


def test_add_bos_starts_every_example_with_the_bos_token_and_never_trains_it(tokenizer):
    config = make_config()
    plain = SampleEncoder(tokenizer, config, seed=0).encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    config.data.add_bos = True
    config.data.bos_token = "<|endoftext|>"
    sample = SampleEncoder(tokenizer, config, seed=0).encode(two_turn_record(), [fake_image(4, 4), fake_image(6, 8)])
    bos = ids(tokenizer, "<|endoftext|>")
    assert sample.tokens == [bos] + plain.tokens
    assert sample.labels == [IGNORE_INDEX] + plain.labels
    assert sample.turn_ids[0] == 0 and sample.turn_ids[1:] == plain.turn_ids


def test_add_bos_needs_a_bos_token_the_tokenizer_knows(tokenizer):
    config = make_config()
    config.data.add_bos = True
    assert tokenizer.bos_token is None  # megavl's tokenizers, like Qwen's, have none
    with pytest.raises(ValueError, match="data.add_bos = true but the tokenizer has no BOS token"):
        SampleEncoder(tokenizer, config, seed=0)
    config.data.bos_token = "<no-such-token>"
    with pytest.raises(ValueError, match="data.bos_token = '<no-such-token>': not a token of the tokenizer"):
        SampleEncoder(tokenizer, config, seed=0)
