"""Conversation records -> token ids, next-token labels and turn ids (Qwen chat format).

A record is the JSON of one training example::

    {"id": ..., "grounding": bool,
     "conversations": [{"role": "user" | "assistant" | "system", "content": str}, ...]}

Each ``<image>`` in user content stands for the next image of the record and
becomes ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``.
Ids are built segment by segment, so which tokens are answer, header or
vision is known exactly rather than recovered from the text afterwards.
"""

from __future__ import annotations

import random
from typing import Sequence, Union

from megavl.config import Config
from megavl.data.batch import IGNORE_INDEX, ImagePatches, Sample
from megavl.data.tokenizer import (
    DEFAULT_SYSTEM_PROMPT,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    VISION_END,
    VISION_START,
)
from megavl.data.tokenizer import ENDOFTEXT as PAD_TOKEN

ROLES = ("system", "user", "assistant")


def special_token_id(tokenizer, token: str) -> int:
    """The id of a special token, looked up by its text so no id is hard-coded."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    # An unknown token maps to the unk id, unless it is the unk token itself (Qwen2's tokenizer
    # makes <|endoftext|> its unk token).
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer has no {token} token")
    return token_id


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return special_token_id(tokenizer, PAD_TOKEN)


def _record_name(record: dict) -> str:
    return repr(record.get("id", "<no id>"))


def _messages(record: dict, prompt: bool = False) -> list[dict]:
    """The record's messages, checked for shape and roles (a prompt ends with a user message
    and needs no answer)."""
    name = _record_name(record)
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"record {name}: 'conversations' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"record {name}: message {i} must be a dict with a string 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"record {name}: message {i} has unknown role {role!r}")
        if role == "system" and i != 0:
            raise ValueError(f"record {name}: system message at position {i}; only the first may be one")
        if role != "user" and IMAGE_PLACEHOLDER in message["content"]:
            raise ValueError(f"record {name}: {IMAGE_PLACEHOLDER} in a {role} message; images belong to user turns")
    if prompt:
        if messages[-1]["role"] != "user":
            raise ValueError(f"record {name}: a prompt ends with a user message, not a {messages[-1]['role']} one")
    elif not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"record {name}: no assistant message, so nothing to train on")
    return messages


def count_image_placeholders(record: dict, prompt: bool = False) -> int:
    """How many images the record refers to; raises ValueError for a malformed record."""
    return sum(m["content"].count(IMAGE_PLACEHOLDER) for m in _messages(record, prompt) if m["role"] == "user")


def image_parts(image) -> list[tuple[str, ImagePatches]]:
    """One placeholder's vision inputs as (tag text, patches) pairs."""
    if isinstance(image, ImagePatches):
        return [("", image)]
    return list(image)


class SampleEncoder:
    """Turns a record and its images into a Sample.

    Conversation masking (each QA turn sees only the shared context and its
    own question) is switched on per example with probability
    ``config.data.conversation_mask_prob``, or
    ``grounding_conversation_mask_prob`` for grounding records. The coin is
    seeded by (seed, record id), so a record gets the same decision on every
    rank, in every epoch and after a resume.
    """

    def __init__(self, tokenizer, config: Config, seed: int):
        self.tokenizer = tokenizer
        self.config = config
        self.seed = seed
        self.merge = config.model.vision.spatial_merge_size
        self.im_start = special_token_id(tokenizer, IM_START)
        self.im_end = special_token_id(tokenizer, IM_END)
        self.image_pad = special_token_id(tokenizer, IMAGE_PAD)
        self.vision_start = special_token_id(tokenizer, VISION_START)
        self.vision_end = special_token_id(tokenizer, VISION_END)
        if self.image_pad != config.model.lm.image_token_id:
            raise ValueError(
                f"tokenizer's {IMAGE_PAD} is id {self.image_pad} but model.lm.image_token_id = "
                f"{config.model.lm.image_token_id}; the model would not find the image tokens"
            )
        # Chat-structure tokens inside message text would silently break the
        # image-token accounting or the turn layout, so such text is refused.
        self._structural = {self.im_start, self.im_end, self.image_pad, self.vision_start, self.vision_end}
        self._newline = self._text("\n")
        self.bos = self._bos_id(tokenizer, config) if config.data.add_bos else None

    @staticmethod
    def _bos_id(tokenizer, config: Config) -> int:
        token = config.data.bos_token or getattr(tokenizer, "bos_token", None)
        if not token:
            raise ValueError(
                "data.add_bos = true but the tokenizer has no BOS token (its bos_token is unset): "
                "name one with data.bos_token"
            )
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None) or \
                tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ValueError(f"data.bos_token = {token!r}: not a token of the tokenizer")
        return token_id

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def uses_conversation_mask(self, record: dict) -> bool:
        d = self.config.data
        prob = d.grounding_conversation_mask_prob if record.get("grounding") else d.conversation_mask_prob
        # random.Random seeds from a str through SHA-512, so the coin does not
        # depend on PYTHONHASHSEED or on the process that draws it.
        rng = random.Random(f"{self.seed}:{record.get('id', '')}")
        return rng.random() < prob

    def encode(self, record: dict, images: Sequence[Union[ImagePatches, Sequence[tuple[str, ImagePatches]]]],
               prompt: bool = False) -> Sample:
        """``images`` holds one entry per <image> placeholder: an ImagePatches,
        or for a tiled image its parts as (tag text, ImagePatches) in order.

        ``prompt``: the record ends with the question to answer; the tokens end with the
        assistant header, exactly as training laid them out before the answer, with no
        targets and no conversation masking (generation sees one visible history)."""
        name = _record_name(record)
        messages = _messages(record, prompt)
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
        if placeholders != len(images):
            raise ValueError(f"record {name}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images")
        masked = not prompt and self.uses_conversation_mask(record)
        # all_text: everything after the system prompt is a target except the image spans.
        all_text = self.config.train.loss_scope == "all_text"
        after_system = False

        tokens: list[int] = []
        trained: list[bool] = []  # whether a token is a target
        turns: list[int] = []

        def add(ids: list[int], turn: int, target: bool = False) -> None:
            tokens.extend(ids)
            trained.extend([target or (all_text and after_system)] * len(ids))
            turns.extend([turn if masked else 0] * len(ids))

        def add_text(text: str, turn: int, target: bool = False) -> None:
            ids = self._text(text)
            if self._structural.intersection(ids):
                raise ValueError(f"record {name}: message text contains chat or vision special tokens")
            add(ids, turn, target)

        if self.bos is not None:
            add([self.bos], 0)
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        else:
            system = DEFAULT_SYSTEM_PROMPT
        add([self.im_start] + self._text("system\n"), 0)
        add_text(system, 0)
        add([self.im_end] + self._newline, 0)
        after_system = True

        image_iter = iter(images)
        flat_images: list[ImagePatches] = []
        turn, previous = 0, None
        for message in messages:
            role, content = message["role"], message["content"]
            # A turn is a question and its answer: consecutive user messages
            # form one question, and an answer with no question before it
            # still opens a turn of its own.
            if previous != "user":
                turn += 1
            previous = role
            add([self.im_start] + self._text(f"{role}\n"), turn)
            if role == "assistant":
                if not content.strip():
                    raise ValueError(f"record {name}: empty assistant answer in turn {turn}")
                add_text(content, turn, target=True)
                add([self.im_end], turn, target=True)
                add(self._newline, turn)
                continue
            pieces = content.split(IMAGE_PLACEHOLDER)
            add_text(pieces[0], turn)
            for piece in pieces[1:]:
                for tag, image in image_parts(next(image_iter)):
                    # Tags and image tokens are shared context (turn 0), so every
                    # later QA turn can look at the image.
                    add_text(tag, 0)
                    tokens.append(self.vision_start)
                    tokens.extend([self.image_pad] * image.num_tokens(self.merge))
                    tokens.append(self.vision_end)
                    span = image.num_tokens(self.merge) + 2
                    trained.extend([False] * span)
                    turns.extend([0] * span)
                    flat_images.append(image)
                add_text(piece, turn)
            add([self.im_end] + self._newline, turn)
        if prompt:
            add([self.im_start] + self._text("assistant\n"), turn)
            return Sample(tokens=tokens, labels=[IGNORE_INDEX] * len(tokens), turn_ids=[0] * len(tokens),
                          images=flat_images, key=str(record.get("id", "")))

        # Position i predicts token i+1.
        labels = [tokens[i + 1] if trained[i + 1] else IGNORE_INDEX for i in range(len(tokens) - 1)]
        labels.append(IGNORE_INDEX)
        return Sample(tokens=tokens, labels=labels, turn_ids=turns, images=flat_images, key=str(record.get("id", "")))
