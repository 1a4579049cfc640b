"""The Hugging Face folders an import reads: each one's config.json and its tensors.

A model usually comes from one folder (--hf). An architecture that is a
language model alone (one with vision_from) takes its vision tower and adapter
from a second folder (--vision-from): only that folder's tensors under the
vision architecture's vision_prefix are read, the rest of it (its own LM) is
ignored.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch

from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.files import CONFIG_NAME, SOURCE_HF_CONFIG, SOURCE_VISION_CONFIG
from megavl.convert.hf_io import SafetensorsCheckpoint, read_hf_config, read_preprocessor_config
from megavl.convert.verify import reserved_token_ids


@dataclass
class Source:
    """One folder of an import and what is taken from it."""

    arch: Architecture
    folder: str
    # The command-line option naming it, for messages.
    option: str
    # The name its config.json is kept under beside the converted checkpoint.
    kept_as: str
    json: dict
    # The transformers config object of json.
    hf_config: Any
    # Only its tensors under this prefix are read ("" = all of them).
    prefix: str = ""


def _transformers_config(arch: Architecture, data: dict, folder: str):
    try:
        return arch.config_class().from_dict(data)
    except Exception as e:  # transformers' own validation, whatever it raises
        raise ConversionError(f"{os.path.join(folder, CONFIG_NAME)}: transformers rejects it: {e}") from e


def open_sources(arch: Architecture, hf_dir: str, hf_json: dict, vision_from: Optional[str]) -> list[Source]:
    """The folders of an import of arch: hf_dir, and vision_from for a language model alone."""
    sources = [Source(arch, hf_dir, "--hf", SOURCE_HF_CONFIG, hf_json, _transformers_config(arch, hf_json, hf_dir))]
    vision = arch.vision_from
    if vision is None:
        if vision_from:
            raise ConversionError(
                f"--vision-from {vision_from}: {hf_dir} holds a {arch.name}, which has its own vision tower; "
                "--vision-from is for a language model without one"
            )
        return sources
    if not vision_from:
        raise ConversionError(
            f"{os.path.join(hf_dir, CONFIG_NAME)}: {arch.name} is a language model without a vision tower; "
            f"import it together with a {vision.name} folder for the vision tower and adapter "
            "(tools/convert_from_hf.py --hf LM_DIR --vision-from VISION_DIR)"
        )
    data = read_hf_config(vision_from)
    found = data.get("architectures") or []
    if vision.name not in found:
        raise ConversionError(f"--vision-from {vision_from}: architectures = {found}, expected [{vision.name}]")
    sources.append(Source(vision, vision_from, "--vision-from", SOURCE_VISION_CONFIG, data,
                          _transformers_config(vision, data, vision_from), prefix=vision.vision_prefix))
    return sources


def vision_preprocessor(sources: list[Source]) -> Optional[dict]:
    """preprocessor_config.json of the folder holding the vision tower (the last one read)."""
    return read_preprocessor_config(sources[-1].folder)


def reserved_ids(sources: list[Source]) -> set[int]:
    """Special-token ids of every folder's config.json, which verification text avoids."""
    return set().union(*(reserved_token_ids(s.json) for s in sources))


def describe(sources: list[Source]) -> str:
    """The folders, for messages: 'Hugging Face checkpoint(s) A [+ B (visual.*)]'."""
    parts = [s.folder + (f" ({s.prefix}*)" if s.prefix else "") for s in sources]
    return f"Hugging Face checkpoint{'s' if len(parts) > 1 else ''} {' + '.join(parts)}"


def provenance(sources: list[Source]) -> list[str]:
    """Where the converted model came from, for the header of its YAML config."""
    first, *rest = sources
    lines = [f"Converted from {first.arch.name} ({os.path.abspath(first.folder)})"]
    for source in rest:
        lines[-1] += " with the vision tower of"
        lines.append(f"{source.arch.name} ({os.path.abspath(source.folder)})")
    lines[-1] += "."
    return lines


def keep_configs(sources: list[Source], out_dir: str) -> None:
    for source in sources:
        shutil.copyfile(os.path.join(source.folder, CONFIG_NAME), os.path.join(out_dir, source.kept_as))


class SourceTensors:
    """The tensors taken from the sources, by the names the mapping tables use, through
    the interface the importer plans with (names, shape, get)."""

    def __init__(self, sources: list[Source]):
        self._readers: dict[str, SafetensorsCheckpoint] = {}
        for source in sources:
            reader = SafetensorsCheckpoint(source.folder, rename=source.arch.canonical_hf_name)
            # What a folder gives by prefix, the folders read before it must not hold.
            clash = [n for n in self._readers if source.prefix and n.startswith(source.prefix)]
            if clash:
                raise ConversionError(
                    f"{self._readers[clash[0]].folder}: holds {source.prefix}* tensors ({clash[0]}, ...), "
                    f"which come from {source.option} {source.folder}"
                )
            self._readers.update({n: reader for n in reader.names() if n.startswith(source.prefix)})

    def names(self) -> list[str]:
        return list(self._readers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._readers[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._readers[name].get(name)

    def num_parameters(self) -> int:
        return sum(math.prod(self.shape(name)) for name in self._readers)
