"""Hugging Face folder(s) -> megavl checkpoint (dist_checkpointing) + megavl_config.yaml.

One flow for every architecture description (megavl.convert.registry). The
megavl model is built whole in one process and the Hugging Face tensors are
streamed into it one mapping at a time, so at most one layer's worth of
Hugging Face tensors is in memory beside the model. The checkpoint is
layout-free: megatron reshards it to the TP/PP layout that loads it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megavl.config import Config, ConfigError, dump_config, validate
from megavl.convert import sources as hf_sources
from megavl.convert.errors import ConversionError, TensorMismatchError
from megavl.convert.files import CONFIG_FILE, CONFIG_NAME
from megavl.convert.hf_io import check_new_folder, read_hf_config
from megavl.convert.mapping import BoundMapping, MappingTable
from megavl.convert.megavl_model import build_single_process_model, model_tensors
from megavl.convert.registry import architecture_for_hf
from megavl.convert.verify import DEFAULT_TOLERANCE, VerifyResult, wants_verification


@dataclass
class ImportResult:
    architecture: str
    config: Config
    out_dir: str
    num_parameters: int
    notes: list[str] = field(default_factory=list)
    verification: Optional[VerifyResult] = None
    # A composed import's record of its parts (megavl.convert.composed.Composition).
    composition: Optional[object] = None


def with_layout(config: Config, tensor: int, pipeline: int) -> Config:
    """A copy of config recording the intended layout, after checking the model splits into it.

    A copy, so the config the description built is never changed under a caller.
    """
    resolved = dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, tensor=tensor, pipeline=pipeline)
    )
    try:
        validate(resolved, world_size=tensor * pipeline)
    except ConfigError as e:
        raise ConversionError(
            f"the model cannot be split into --tensor {tensor} --pipeline {pipeline}: {e}"
        ) from e
    return resolved


def plan_import(table: MappingTable, megavl: dict[str, torch.Tensor], checkpoint, where: str) -> list[BoundMapping]:
    """The mappings to apply, after checking every tensor's presence and shape (all problems at once)."""
    plan = table.bind(megavl)
    wanted = {name for bound in plan for name in bound.hf}
    available = set(checkpoint.names())
    missing = wanted - available
    unexpected = {n for n in available - wanted if not table.is_ignorable(n)}
    shapes = []
    for bound in plan:
        expected = bound.hf_shapes([megavl[name].shape for name in bound.megavl])
        for name, shape in zip(bound.hf, expected):
            if name in available and checkpoint.shape(name) != shape:
                shapes.append((name, shape, checkpoint.shape(name)))
    if missing or unexpected or shapes:
        raise TensorMismatchError(where, missing, unexpected, shapes)
    return plan


@torch.no_grad()
def write_converted_checkpoint(
    config: Config, table: MappingTable, checkpoint, where: str, out_dir: str, header: list[str]
) -> int:
    """Builds the megavl model, streams the mapped HF tensors into it, and writes the
    weights and the YAML config, under the comment lines of header, to out_dir. Returns the
    number of tensors."""
    from megavl.training.checkpoint import save_model_weights

    model = build_single_process_model(config)
    megavl = model_tensors(model)
    for bound in plan_import(table, megavl, checkpoint, where):
        values = bound.to_megavl([checkpoint.get(name) for name in bound.hf])
        for name, value in zip(bound.megavl, values):
            megavl[name].copy_(value)
        del values
    os.makedirs(out_dir, exist_ok=True)
    save_model_weights(model, out_dir)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        for line in header:
            f.write(f"# {line}\n")
        f.write(dump_config(config))
    written = len(megavl)
    del model, megavl
    gc.collect()
    return written


@torch.no_grad()
def import_from_hf(
    hf_dir: str,
    out_dir: str,
    tensor: int = 1,
    pipeline: int = 1,
    vision_from: Optional[str] = None,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Converts the Hugging Face model in hf_dir into a megavl checkpoint in out_dir.

    vision_from: for a language model without a vision tower (e.g. Qwen3-MoE), the
    folder whose vision tower and adapter complete it. verify=None verifies models
    under 2e9 parameters; the result's verification says whether the outputs agree
    (callers decide what a failure means). Raises ConversionError for anything that
    prevents the conversion.
    """
    hf_json = read_hf_config(hf_dir)
    arch = architecture_for_hf(hf_json, os.path.join(hf_dir, CONFIG_NAME))
    sources = hf_sources.open_sources(arch, hf_dir, hf_json, vision_from)
    config, notes = arch.megavl_config([s.hf_config for s in sources], hf_sources.vision_preprocessor(sources))
    config = with_layout(config, tensor, pipeline)
    check_new_folder(out_dir, "--out")

    checkpoint = hf_sources.SourceTensors(sources)
    num_parameters = checkpoint.num_parameters()
    companions = "".join(f" with the vision tower of {s.folder}" for s in sources[1:])
    log(f"import: {arch.name} from {hf_dir}{companions}: {num_parameters / 1e6:.1f}M parameters")
    for note in notes:
        log(f"  note: {note}")

    written = write_converted_checkpoint(
        config, arch.table(config), checkpoint, hf_sources.describe(sources), out_dir,
        header=hf_sources.provenance(sources) + [
            f"model.lm.image_attention is {config.model.lm.image_attention} to reproduce the Hugging Face model."],
    )
    hf_sources.keep_configs(sources, out_dir)
    log(f"import: wrote {written} tensors to {out_dir} (layout-free; intended TP={tensor} PP={pipeline}) "
        f"and {CONFIG_FILE}")

    result = ImportResult(arch.name, config, out_dir, num_parameters, notes)
    if wants_verification(verify, num_parameters):
        result.verification = arch.verify(
            [s.folder for s in sources], config, out_dir, reserved=hf_sources.reserved_ids(sources),
            tolerance=tolerance,
        )
        log(result.verification.describe())
    return result


def import_pairing(lm_dir: str, vision_dir: str, out_dir: str, **options) -> ImportResult:
    """import_from_hf of a language model (lm_dir) with the vision tower of vision_dir."""
    return import_from_hf(lm_dir, out_dir, vision_from=vision_dir, **options)
