"""Config fields that mean the same in megavl and in a Hugging Face config.json.

A FieldTable lists the pairs once and reads them in both directions, so the
import (config.json -> megavl Config) and the export (the reverse) cannot
drift apart. Fields whose translation is more than a rename stay with the
description that needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Field:
    megavl: str
    hf: str
    # Applied to the Hugging Face value on import (e.g. float for a JSON number
    # that may have been written as an integer).
    cast: Optional[Callable[[Any], Any]] = None


class FieldTable:
    def __init__(self, *fields: Field):
        self.fields = fields

    def from_hf(self, hf_config) -> dict:
        """megavl field -> value, read from a transformers config object."""
        values = {}
        for f in self.fields:
            value = getattr(hf_config, f.hf)
            values[f.megavl] = f.cast(value) if f.cast is not None else value
        return values

    def to_hf(self, section) -> dict:
        """config.json field -> value, read from a megavl config section."""
        return {f.hf: getattr(section, f.megavl) for f in self.fields}


# megavl's train.dtype <-> config.json's dtype.
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def dtype_name(hf_config) -> tuple[str, Optional[str]]:
    """megavl's train.dtype for the checkpoint's dtype, and a note when it had to differ."""
    raw = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(raw).replace("torch.", "") if raw is not None else "float32"
    for megavl, hf in DTYPES.items():
        if name == hf:
            return megavl, None
    return "fp32", f"train.dtype = fp32: the checkpoint's dtype {name} is not a megavl dtype; weights are upcast"
