"""A Qwen3-MoE language model paired with a Qwen2.5-VL vision tower <-> megavl.

No single Hugging Face architecture holds this model, so it comes from two
folders: the language model from a Qwen3MoeForCausalLM checkpoint and the
vision tower plus patch-merger adapter from a Qwen2_5_VLForConditionalGeneration
checkpoint (whose own language model is ignored). The merger's output width
must equal the LM's hidden size (e.g. Qwen2.5-VL-3B's 2048 for Qwen3-30B-A3B).

Export writes the language model as a Qwen3MoeForCausalLM folder; the vision
tower and adapter have no Hugging Face home without a language model and are
not exported.
"""

from __future__ import annotations

import gc
import os
import shutil
from typing import Callable, Optional

import torch

from megavl.config import Config
from megavl.convert import qwen2_5_vl, qwen3_moe, qwen_common
from megavl.convert.errors import ConversionError, UnsupportedModelError
from megavl.convert.exporter import HF_DTYPES, DEFAULT_MAX_SHARD_SIZE, ExportResult
from megavl.convert.hf_io import (
    CONFIG_NAME,
    SafetensorsCheckpoint,
    ShardedSafetensorsWriter,
    check_new_folder,
    parse_size,
    read_hf_config,
    read_json,
    read_preprocessor_config,
)
from megavl.convert.importer import SOURCE_HF_CONFIG, ImportResult, check_layout, write_converted_checkpoint
from megavl.convert.mapping import MappingTable
from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
from megavl.convert.verify import AUTO_VERIFY_MAX_PARAMS, DEFAULT_TOLERANCE, reserved_token_ids
from megavl.convert.verify_pairing import verify_language_model, verify_pairing

# The vision checkpoint's config.json, kept beside the converted checkpoint.
SOURCE_VISION_CONFIG = "hf_vision_config.json"
_VISION_PREFIX = "visual."


class PairedCheckpoint:
    """The tensors of the LM folder plus the `visual.*` tensors of the vision folder,
    read through the interface the importer plans with (names, shape, get)."""

    def __init__(self, lm: SafetensorsCheckpoint, vision: SafetensorsCheckpoint):
        clash = [n for n in lm.names() if n.startswith(_VISION_PREFIX)]
        if clash:
            raise ConversionError(f"{lm.folder}: the language model holds vision tensors ({clash[0]}, ...)")
        self._sources = {name: lm for name in lm.names()}
        self._sources.update({n: vision for n in vision.names() if n.startswith(_VISION_PREFIX)})

    def names(self) -> list[str]:
        return list(self._sources)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._sources[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        return self._sources[name].get(name)

    def num_parameters(self) -> int:
        total = 0
        for name in self._sources:
            count = 1
            for d in self.shape(name):
                count *= d
            total += count
        return total


def _hf_config(folder: str, expected: str, config_class, option: str):
    data = read_hf_config(folder)
    found = data.get("architectures") or []
    if expected not in found:
        raise ConversionError(
            f"{option} {folder}: architectures = {found}, expected [{expected}]"
        )
    try:
        return data, config_class().from_dict(data)
    except Exception as e:  # transformers' own validation, whatever it raises
        raise ConversionError(f"{os.path.join(folder, CONFIG_NAME)}: transformers rejects it: {e}") from e


def paired_config(lm_hf, vision_hf, preprocessor: Optional[dict]) -> tuple[Config, list[str]]:
    """megavl's Config for a Qwen3-MoE LM (lm_hf) with Qwen2.5-VL's vision tower (vision_hf)."""
    # The Qwen2.5-VL translation gives the vision tower and image settings; its LM is replaced.
    config, vision_notes = qwen2_5_vl.Qwen2_5_VL().megavl_config(vision_hf, preprocessor)
    notes = [n for n in vision_notes if n not in (qwen_common.CAUSAL_NOTE, qwen_common.LORA_NOTE)]
    problems: list[str] = []
    config.model.lm = qwen3_moe.lm_config(lm_hf, vision_hf.image_token_id, problems)
    out = vision_hf.vision_config.out_hidden_size
    if out != lm_hf.hidden_size:
        problems.append(
            f"vision_config.out_hidden_size = {out} (Qwen2.5-VL merger output) must equal the Qwen3-MoE "
            f"hidden_size = {lm_hf.hidden_size}; pick a Qwen2.5-VL whose LM width matches"
        )
    if problems:
        raise ConversionError(
            f"{qwen3_moe.NAME} + Qwen2.5-VL vision: megavl cannot reproduce this model:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    config.train.dtype, dtype_note = qwen_common.dtype_name(lm_hf)
    if dtype_note:
        notes.append(dtype_note)
    notes += [
        qwen_common.CAUSAL_NOTE,
        qwen_common.LORA_NOTE,
        "model.lm.rope = 1d: Qwen3-MoE's RoPE; image tokens get the positions of megavl's temporal axis",
    ]
    return config, notes


def table(config: Config) -> MappingTable:
    return MappingTable(
        qwen2_5_vl.vision_mappings(config) + qwen_common.adapter_mappings(norm_bias=False)
        + qwen3_moe.lm_mappings(config),
        ignorable_hf=qwen3_moe.ignorable_hf_tensors(config),
    )


@torch.no_grad()
def import_pairing(
    lm_dir: str,
    vision_dir: str,
    out_dir: str,
    tensor: int = 1,
    pipeline: int = 1,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Converts a Qwen3-MoE LM folder plus a Qwen2.5-VL folder (vision tower, adapter)
    into a megavl checkpoint in out_dir; see import_from_hf for the rest."""
    lm_json, lm_hf = _hf_config(lm_dir, qwen3_moe.NAME, qwen3_moe.config_class, "--hf")
    vision = qwen2_5_vl.Qwen2_5_VL()
    vision_json, vision_hf = _hf_config(vision_dir, vision.name, vision.config_class, "--vision-from")
    config, notes = paired_config(lm_hf, vision_hf, read_preprocessor_config(vision_dir))
    check_layout(config, tensor, pipeline)
    check_new_folder(out_dir, "--out")

    checkpoint = PairedCheckpoint(
        SafetensorsCheckpoint(lm_dir), SafetensorsCheckpoint(vision_dir, rename=vision.canonical_hf_name)
    )
    num_parameters = checkpoint.num_parameters()
    log(f"import: {qwen3_moe.NAME} from {lm_dir} with the Qwen2.5-VL vision tower of {vision_dir}: "
        f"{num_parameters / 1e6:.1f}M parameters")
    for note in notes:
        log(f"  note: {note}")

    written = write_converted_checkpoint(
        config, table(config), checkpoint, f"Hugging Face checkpoints {lm_dir} + {vision_dir} (visual.*)", out_dir,
        header=[f"Converted from {qwen3_moe.NAME} ({os.path.abspath(lm_dir)}) with the vision tower of",
                f"{vision.name} ({os.path.abspath(vision_dir)})."],
    )
    shutil.copyfile(os.path.join(lm_dir, CONFIG_NAME), os.path.join(out_dir, SOURCE_HF_CONFIG))
    shutil.copyfile(os.path.join(vision_dir, CONFIG_NAME), os.path.join(out_dir, SOURCE_VISION_CONFIG))
    log(f"import: wrote {written} tensors to {out_dir} (layout-free; intended TP={tensor} PP={pipeline})")

    result = ImportResult(qwen3_moe.NAME, config, out_dir, num_parameters, notes)
    if verify is None:
        verify = num_parameters < AUTO_VERIFY_MAX_PARAMS
    if verify:
        result.verification = verify_pairing(
            lm_dir, vision_dir, config, out_dir, reserved=_reserved(lm_json, vision_json), tolerance=tolerance
        )
        log(result.verification.describe())
    return result


def _reserved(lm_json: dict, vision_json: dict) -> set[int]:
    return reserved_token_ids(lm_json) | reserved_token_ids(vision_json)


@torch.no_grad()
def export_language_model(
    load_dir: str,
    out_dir: str,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes the LM of the megavl model in load_dir as a Qwen3MoeForCausalLM folder.

    The vision tower and adapter are left out. Vision-only LoRA adapters are
    left out too: they act on image tokens only, which a text model never sees.
    verify compares text-only logits with the exported model.
    """
    from megavl.training.checkpoint import load_model_weights

    config = load_megavl_config(load_dir)
    problems = qwen3_moe.export_problems(config)
    if problems:
        raise UnsupportedModelError(
            f"{qwen3_moe.NAME} cannot reproduce this megavl LM:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    max_shard_bytes = parse_size(max_shard_size)
    check_new_folder(out_dir, "--out")
    source = os.path.join(load_dir, SOURCE_HF_CONFIG)
    base = read_json(source) if os.path.isfile(source) else None
    hf_config = qwen3_moe.hf_config(config, base)
    hf_config.dtype = HF_DTYPES[config.train.dtype]

    model = build_single_process_model(config)
    load_model_weights(model, load_dir, allow_fresh_adapters=True)
    tensors = {k: v for k, v in model_tensors(model).items() if k.startswith("language_model.")}
    num_parameters = sum(t.numel() for t in tensors.values())
    log(f"export: the LM of {load_dir} as {qwen3_moe.NAME}: {num_parameters / 1e6:.1f}M parameters")
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    lm_table = MappingTable(qwen3_moe.lm_mappings(config))
    for bound in lm_table.bind(tensors):
        for name, value in zip(bound.hf, bound.to_hf([tensors[n] for n in bound.megavl])):
            writer.add(name, value)
    shards = writer.close()
    hf_config.save_pretrained(out_dir)
    log(f"export: wrote {len(shards)} safetensors shard(s) and config.json to {out_dir}")

    result = ExportResult(qwen3_moe.NAME, config, out_dir, num_parameters, shards)
    if verify is None:
        verify = num_parameters < AUTO_VERIFY_MAX_PARAMS
    if verify:
        del tensors, model
        gc.collect()
        result.verification = verify_language_model(
            out_dir, config, load_dir, reserved=reserved_token_ids(hf_config.to_dict()), tolerance=tolerance
        )
        log(result.verification.describe())
    return result
