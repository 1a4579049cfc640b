"""Special-token ids an exported config.json carries.

megavl's Config holds only the image token id; the others come from a
tokenizer when the export is given one, else from the config.json the model
was imported from, else (for the vision-language classes) megavl's tokenizer
layout, which puts the special tokens at fixed ids.
"""

from __future__ import annotations

from typing import Optional

from megavl.convert.errors import ConversionError
from megavl.data import tokenizer as tok

TOP_TOKEN_KEYS = ("vision_start_token_id", "vision_end_token_id", "video_token_id")
TEXT_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def megavl_token_ids() -> dict:
    """The ids megavl's own tokenizer gives the special tokens."""
    return {
        "vision_start_token_id": tok.SPECIAL_TOKENS.index(tok.VISION_START),
        "vision_end_token_id": tok.SPECIAL_TOKENS.index(tok.VISION_END),
        "bos_token_id": tok.SPECIAL_TOKENS.index(tok.ENDOFTEXT),
        "eos_token_id": tok.SPECIAL_TOKENS.index(tok.IM_END),
        "pad_token_id": tok.SPECIAL_TOKENS.index(tok.ENDOFTEXT),
    }


def pick_token_ids(keys, token_ids: dict, base: dict, defaults: dict) -> dict:
    """For each key: the tokenizer's id, else base's, else defaults'; keys none of them has are left out."""
    picked = {}
    for key in keys:
        for source in (token_ids, base, defaults):
            if key in source:
                picked[key] = source[key]
                break
    return picked


def vl_token_fields(token_ids: dict, base: Optional[dict]) -> tuple[dict, dict]:
    """(top-level, text_config) special-token ids of a vision-language config.json."""
    base = base or {}
    defaults = megavl_token_ids()
    # Top-level ids nobody gives (e.g. video_token_id for megavl's tokenizer) are left
    # to transformers' defaults; every text_config id has a default here.
    top = {k: v for k, v in pick_token_ids(TOP_TOKEN_KEYS, token_ids, base, defaults).items() if v is not None}
    text = pick_token_ids(TEXT_TOKEN_KEYS, token_ids, base.get("text_config") or base, defaults)
    return top, text


def tokenizer_token_ids(tokenizer) -> dict:
    """Special-token ids of a megavl or Qwen tokenizer, as config.json fields."""
    vocab = tokenizer.get_vocab()
    ids = {}
    for key, token in (("vision_start_token_id", tok.VISION_START), ("vision_end_token_id", tok.VISION_END),
                       ("video_token_id", "<|video_pad|>"), ("bos_token_id", tok.ENDOFTEXT)):
        if token in vocab:
            ids[key] = vocab[token]
    if tokenizer.eos_token_id is not None:
        ids["eos_token_id"] = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = tokenizer.pad_token_id
    return ids


def load_tokenizer_for(path: str, config):
    """The tokenizer folder given as --tokenizer, after checking it fits the model's config."""
    try:
        tokenizer = tok.load_tokenizer(path)
        tok.check_tokenizer_matches_model(tokenizer, config)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"--tokenizer {path}: {e}") from e
    return tokenizer
