"""Byte-level BPE tokenizer: fixed special-token ids, round trips, chat format, loading errors."""

from __future__ import annotations

import pytest

from megavl.data.tokenizer import (
    IMAGE_PAD,
    SPECIAL_TOKENS,
    load_tokenizer,
    render_chat,
    special_token_ids,
    train_tokenizer,
)

VOCAB = 400

ENGLISH = [
    "How many red circles are there in the picture?",
    "Point to the blue square next to the yellow triangle.",
    "Give the bounding box of the green triangle, please.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm carpet.",
    "Reading, writing and counting are the first lessons children learn at school.",
    "A small boat sailed across the quiet harbour before the morning storm arrived.",
]
ARABIC = [
    "كم عدد الدوائر الحمراء؟",
    "أشر إلى المربع الأزرق.",
    "ما المكتوب في الصورة؟",
    "ذهب الطفل إلى المدرسة في الصباح الباكر مع أخته الصغيرة.",
    "تشرق الشمس على الجبال والوديان وتغرب خلف البحر الواسع.",
]
CORPUS = (ENGLISH + ARABIC) * 20

CONVERSATION = [
    {"role": "user", "content": "<image>\nHow many red circles?"},
    {"role": "assistant", "content": "3"},
]
EXPECTED_CHAT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nHow many red circles?<|im_end|>\n"
    "<|im_start|>assistant\n3<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(CORPUS, VOCAB, str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


def test_special_tokens_take_ids_0_to_11(tokenizer):
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(12))
    ids = special_token_ids(tokenizer)
    assert ids["pad"] == 0 and ids["im_start"] == 1 and ids["im_end"] == 2 and ids["image_pad"] == 3
    assert ids["point_end"] == 11 and sorted(ids.values()) == list(range(12))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_vocab_size_is_as_asked(tokenizer):
    assert len(tokenizer) == VOCAB
    assert max(tokenizer.get_vocab().values()) == VOCAB - 1


def test_small_corpus_gives_a_smaller_vocab(tmp_path):
    tokenizer = train_tokenizer(["ab ab"], 1000, str(tmp_path))
    # Specials, the 256 bytes, then the only merges the corpus has: a+b and the space-led Ġ+ab.
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 256 + 2
    assert tokenizer.convert_ids_to_tokens([268, 269]) == ["ab", "Ġab"]
    ids = tokenizer.encode("ab ab", add_special_tokens=False)
    assert ids == [268, 269]  # every word of the corpus is one token
    assert tokenizer.decode(ids) == "ab ab"


def test_too_small_vocab_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 268"):
        train_tokenizer(CORPUS, 100, str(tmp_path))


@pytest.mark.parametrize(
    "text",
    ARABIC
    + ENGLISH
    + [
        "مرحبا بالعالم 2024! Hello, world.",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Unseen scripts survive byte-level BPE: 你好, Ωμέγα, emoji 🙂",
    ],
)
def test_text_round_trips_exactly(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens_encode_as_single_ids(tokenizer):
    text = "<|object_ref_start|>the blue square<|object_ref_end|><|point_start|>(120, 340)<|point_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 6 and 7 in ids and 10 in ids and ids[-1] == 11
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the blue square(120, 340)"


def test_digits_are_single_tokens(tokenizer):
    ids = tokenizer.encode("(805, 120)", add_special_tokens=False)
    digits = [t for t in tokenizer.convert_ids_to_tokens(ids) if t.isdigit()]
    assert digits == list("805120")


def test_chat_template_one_image_one_answer(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT
    assert render_chat(CONVERSATION) == EXPECTED_CHAT
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == EXPECTED_CHAT.rsplit("<|im_start|>assistant", 1)[0] + "<|im_start|>assistant\n"
    ids = tokenizer.encode(EXPECTED_CHAT, add_special_tokens=False)
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_PAD)) == 1
    assert ids[0] == 1 and ids[-2:] == tokenizer.encode("<|im_end|>\n", add_special_tokens=False)


def test_chat_template_keeps_an_explicit_system_prompt_and_image_parts(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written?"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is written?<|im_end|>\n"
    )


def test_training_is_deterministic(tokenizer_dir, tmp_path):
    train_tokenizer(CORPUS, VOCAB, str(tmp_path))
    assert (tmp_path / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()


def test_load_tokenizer_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_tokenizer(str(missing))
    assert str(missing) in str(error.value)


def test_load_tokenizer_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as error:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(error.value)


def test_special_token_ids_names_missing_tokens():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    with pytest.raises(KeyError, match=r"image_pad \(<\|image_pad\|>\)"):
        special_token_ids(plain)
