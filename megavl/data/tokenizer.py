"""Byte-level BPE tokenizer with Qwen2-VL's special tokens and chat format.

The special tokens always take ids 0..11 in the order of ``SPECIAL_TOKENS``,
so a model config can name them by id (e.g. ``image_token_id: 3``) before any
tokenizer exists. Tokenizers saved here, and Qwen2-VL's own, load with
``load_tokenizer``; code that needs the ids asks ``special_token_ids``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterable, Iterator

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
POINT_START = "<|point_start|>"
POINT_END = "<|point_end|>"

# Order is the id: SPECIAL_TOKENS[i] gets id i.
SPECIAL_TOKENS = [
    ENDOFTEXT,
    IM_START,
    IM_END,
    IMAGE_PAD,
    VISION_START,
    VISION_END,
    OBJECT_REF_START,
    OBJECT_REF_END,
    BOX_START,
    BOX_END,
    POINT_START,
    POINT_END,
]

# Short names used by special_token_ids(); "pad" is <|endoftext|>, as in Qwen2.
SPECIAL_TOKEN_NAMES = {
    "pad": ENDOFTEXT,
    "im_start": IM_START,
    "im_end": IM_END,
    "image_pad": IMAGE_PAD,
    "vision_start": VISION_START,
    "vision_end": VISION_END,
    "object_ref_start": OBJECT_REF_START,
    "object_ref_end": OBJECT_REF_END,
    "box_start": BOX_START,
    "box_end": BOX_END,
    "point_start": POINT_START,
    "point_end": POINT_END,
}

# Where an image goes inside a plain-string message content.
IMAGE_PLACEHOLDER = "<image>"
# A single pad stands for the whole image; the data pipeline expands it to one
# pad per merged vision token once the image size is known.
IMAGE_TEXT = VISION_START + IMAGE_PAD + VISION_END
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's pre-tokenizer split: digits one at a time (so coordinates and counts
# tokenise uniformly), letters in runs, punctuation and whitespace apart.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Content may be a string with IMAGE_PLACEHOLDERs, or Qwen2-VL's list of
# {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] | replace('" + IMAGE_PLACEHOLDER + "', '" + IMAGE_TEXT + "') }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}" + IMAGE_TEXT +
    "{% elif 'text' in part %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Files any of which makes a folder loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE applied without a tokenizer (for training-text corpora and checks)."""
    return _compiled_template().render(messages=messages, add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=1)
def _compiled_template():
    import jinja2

    # The same whitespace options transformers' apply_chat_template uses.
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return environment.from_string(CHAT_TEMPLATE)


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    # The BPE trainer does not split out special tokens itself; merges learnt
    # across "<|...|>" would be wasted vocabulary.
    for text in texts:
        for piece in _SPECIAL_RE.split(text):
            if piece:
                yield piece


def _bpe_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Trains a byte-level BPE on ``texts``, saves it to ``out_dir`` and returns it.

    The vocabulary is the 12 special tokens (ids 0..11), the 256 byte symbols,
    then learnt merges, ``vocab_size`` in all. A corpus too small to supply
    that many merges gives a smaller vocabulary (every word already one
    token); ``len(tokenizer)`` tells the real size. The same texts give the
    same tokenizer.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (special tokens + 256 bytes), got {vocab_size}")

    tokenizer = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    _check_special_ids(tokenizer.token_to_id)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    return wrapped


def _check_special_ids(token_to_id) -> None:
    for expected, token in enumerate(SPECIAL_TOKENS):
        if token_to_id(token) != expected:
            raise RuntimeError(f"special token {token} got id {token_to_id(token)}, expected {expected}")


def load_tokenizer(path: str):
    """Loads a local Hugging Face tokenizer folder; never contacts a hub."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer folder {path!r} does not exist; make one with "
            f"`python tools/make_synthetic_data.py --out DIR` (writes DIR/tokenizer) "
            f"or point to a downloaded Hugging Face tokenizer folder"
        )
    present = [name for name in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise FileNotFoundError(
            f"tokenizer folder {path!r} has none of {', '.join(_TOKENIZER_FILES)}; "
            f"it is not a saved Hugging Face tokenizer"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the Qwen2-VL special tokens, by short name ("pad", "image_pad", ...)."""
    ids: dict[str, int] = {}
    missing: list[str] = []
    vocab = tokenizer.get_vocab()
    for name, token in SPECIAL_TOKEN_NAMES.items():
        # get_vocab() includes added tokens; convert_tokens_to_ids would map
        # an unknown token to unk instead of failing.
        if token in vocab:
            ids[name] = vocab[token]
        else:
            missing.append(f"{name} ({token})")
    if missing:
        source = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise KeyError(f"tokenizer {source!r} lacks special tokens: {', '.join(missing)}")
    return ids


def check_tokenizer_matches_model(tokenizer, config) -> None:
    """Fails before training when the tokenizer and the model's embedding table disagree."""
    lm = config.model.lm
    problems = []
    if len(tokenizer) > lm.vocab_size:
        problems.append(
            f"the tokenizer has {len(tokenizer)} tokens but model.lm.vocab_size = {lm.vocab_size}; "
            f"set model.lm.vocab_size >= {len(tokenizer)}"
        )
    image_pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if image_pad != lm.image_token_id:
        problems.append(
            f"model.lm.image_token_id = {lm.image_token_id} but the tokenizer's {IMAGE_PAD} is id {image_pad}; "
            f"set model.lm.image_token_id={image_pad}"
        )
    if problems:
        raise ValueError("tokenizer does not match the model config: " + "; ".join(problems))
