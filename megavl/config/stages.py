"""Stage presets: ``train.stage`` names a training stage whose usual settings become the
defaults of that config. Every field a preset sets can still be set in the YAML or with
``--set``: the preset sits between the built-in defaults and the config file.

    align     only the adapter trains, on all text, vision LoRA inactive (LLaVA / NVLM
              pretraining, ZAYA1 stage 1, SiQ-VL stage 1)
    pretrain  everything trains, on the answers
    sft       everything trains, on the answers (instruction tuning)
    expand_embeddings
              only the LM's input embedding and output layer train, on the answers, without
              weight decay: new tokens' rows after tools/expand_vocab.py (ZAYA1-VL stage 3);
              with train.embedding_rows_from=N (the tool prints N) the rows of the old tokens
              stay bit-identical

A stage that follows another starts from its weights with ``checkpoint.pretrained``
(fresh optimizer and schedule); the run records the chain in its checkpoints.
"""

from __future__ import annotations

import copy
from typing import Any

_FROZEN = {"train": False}
_TRAINS = {"train": True}

PRESETS: dict[str, dict[str, Any]] = {
    "align": {
        "train": {
            "loss_scope": "all_text",
            "parts": {
                "vision": dict(_FROZEN), "adapter": dict(_TRAINS), "lm": dict(_FROZEN),
                "lm_embeddings": dict(_FROZEN), "output_layer": dict(_FROZEN),
                "vision_lora": dict(_FROZEN), "router": dict(_FROZEN),
            },
        },
        "model": {"lm": {"vision_lora": {"enabled": False}}},
    },
    "pretrain": {"train": {"loss_scope": "answers"}},
    "sft": {"train": {"loss_scope": "answers"}},
    # wd_mult 0: decoupled weight decay would otherwise shrink the rows train.embedding_rows_from
    # keeps unchanged (checks.py refuses the two together).
    "expand_embeddings": {
        "train": {
            "loss_scope": "answers",
            "parts": {
                "vision": dict(_FROZEN), "adapter": dict(_FROZEN), "lm": dict(_FROZEN),
                "lm_embeddings": {"train": True, "wd_mult": 0.0}, "output_layer": {"train": True, "wd_mult": 0.0},
                "vision_lora": dict(_FROZEN), "router": dict(_FROZEN),
            },
        },
    },
}


def with_stage_preset(data: dict) -> dict:
    """The config data with its stage's preset underneath (the data's own values win)."""
    train = data.get("train")
    stage = train.get("stage") if isinstance(train, dict) else None
    if stage is None or stage not in PRESETS:
        return data  # no stage, or an unknown one that validation names with the valid choices
    return _merged(copy.deepcopy(PRESETS[stage]), data)


def _merged(base: dict, top: dict) -> dict:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merged(base[key], value)
        else:
            base[key] = value
    return base
