"""Reading and writing Hugging Face model folders: config.json and safetensors.

Tensors are read one at a time (``safetensors.safe_open``, never pickles), and
each file is opened only for the tensor being read, so the memory mapping of a
multi-gigabyte shard does not stay resident while the next tensors stream in.
Writing buffers at most one shard.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megavl.convert.errors import ConversionError
from megavl.convert.files import CONFIG_NAME, INDEX_FILE, PREPROCESSOR_NAME, SINGLE_FILE


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConversionError(f"{folder!r} has no {CONFIG_NAME}; expected a Hugging Face model folder")
    return read_json(path)


def read_preprocessor_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, PREPROCESSOR_NAME)
    return read_json(path) if os.path.isfile(path) else None


def check_new_folder(path: str, option: str) -> None:
    """Outputs go to a new or empty folder, so nothing stale is mixed into them."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionError(f"{option} {path!r} exists and is not a folder")
    if os.path.isdir(path) and os.listdir(path):
        raise ConversionError(f"{option} {path!r} is not empty; give a new or empty folder")


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text) -> int:
    """'2GB', '500MB', '1GiB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)?\s*", str(text).upper())
    if not m:
        raise ConversionError(f"shard size {text!r}: expected a size such as 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"])


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face folder (one model.safetensors, or shards plus an index).

    rename maps a stored name to the canonical name the mapping tables use, so
    checkpoints written by other transformers versions read the same.
    """

    def __init__(self, folder: str, rename: Callable[[str], str] = lambda name: name):
        self.folder = folder
        self._files = self._list_files(folder)
        self._stored: dict[str, tuple[str, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in self._files:
            # Only the header is read here.
            with safe_open(file, framework="pt") as f:
                for stored in f.keys():
                    name = rename(stored)
                    if name in self._stored:
                        raise ConversionError(
                            f"{folder}: tensors {self._stored[name][1]!r} and {stored!r} both stand for {name!r}"
                        )
                    self._stored[name] = (file, stored)
                    self._shapes[name] = tuple(f.get_slice(stored).get_shape())

    @staticmethod
    def _list_files(folder: str) -> list[str]:
        index = os.path.join(folder, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: no 'weight_map' naming the tensors' files")
            files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise ConversionError(f"{index} names files that do not exist: {', '.join(absent)}")
            return files
        single = os.path.join(folder, SINGLE_FILE)
        if os.path.isfile(single):
            return [single]
        present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise ConversionError(
            f"{folder!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {', '.join(present) or 'nothing'}); "
            "only safetensors checkpoints are read (pickled .bin files are not loaded)"
        )

    def names(self) -> list[str]:
        return list(self._stored)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

    def get(self, name: str) -> torch.Tensor:
        file, stored = self._stored[name]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(stored)


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes each (a single
    larger tensor gets a shard of its own) plus model.safetensors.index.json."""

    def __init__(self, folder: str, max_shard_bytes: int):
        if max_shard_bytes < 1:
            raise ConversionError(f"max shard size {max_shard_bytes}: must be positive")
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        os.makedirs(folder, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ConversionError(f"tensor {name!r} written twice")
        self._names.add(name)
        # A fresh contiguous copy: views of one megavl tensor (q, k, v) must not share
        # storage, which safetensors refuses.
        tensor = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = os.path.join(self.folder, f".shard-{len(self._shards):05d}.partial")
        save_file(self._pending, path, metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[str]:
        """Renames the shards to model-0000i-of-0000N.safetensors, writes the index, returns the shard paths."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map, paths = {}, []
        for i, (partial, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(partial, os.path.join(self.folder, final))
            paths.append(os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        write_json(
            os.path.join(self.folder, INDEX_FILE),
            {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
        )
        return paths

