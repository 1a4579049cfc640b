"""megavl checkpoint -> Hugging Face folder (config.json, safetensors shards + index,
preprocessor_config.json, optionally the tokenizer) that transformers' from_pretrained loads.

The checkpoint may have been saved under any TP/PP layout: it is loaded into a
whole model in one process (dist_checkpointing reshards), whose tensors are
then mapped and written shard by shard.
"""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megavl.config import Config
from megavl.convert import qwen_common
from megavl.convert.errors import ConversionError
from megavl.convert.hf_io import (
    PREPROCESSOR_NAME,
    ShardedSafetensorsWriter,
    check_new_folder,
    parse_size,
    read_json,
    write_json,
)
from megavl.convert.importer import SOURCE_HF_CONFIG
from megavl.convert.megavl_model import build_single_process_model, load_megavl_config, model_tensors
from megavl.convert.registry import architecture_for_megavl
from megavl.convert.verify import (
    AUTO_VERIFY_MAX_PARAMS,
    DEFAULT_TOLERANCE,
    VerifyResult,
    reserved_token_ids,
    verify_conversion,
)

# Small shards bound the memory the writer holds beside the model.
DEFAULT_MAX_SHARD_SIZE = "2GB"
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclass
class ExportResult:
    architecture: str
    config: Config
    out_dir: str
    num_parameters: int
    shards: list[str]
    verification: Optional[VerifyResult] = None


def _load_tokenizer(path: str, config: Config):
    from megavl.data.tokenizer import check_tokenizer_matches_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
        check_tokenizer_matches_model(tokenizer, config)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"--tokenizer {path}: {e}") from e
    return tokenizer


@torch.no_grad()
def export_to_hf(
    load_dir: str,
    out_dir: str,
    tokenizer: Optional[str] = None,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    architecture: Optional[str] = None,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes the megavl model in load_dir as a Hugging Face model folder out_dir.

    architecture=None picks the supported architecture that reproduces the
    model, and refuses (UnsupportedModelError, with the reasons) when none
    does. verify=None verifies models under 2e9 parameters.
    """
    from megavl.training.checkpoint import load_model_weights

    config = load_megavl_config(load_dir)
    arch = architecture_for_megavl(config, architecture)
    max_shard_bytes = parse_size(max_shard_size)
    check_new_folder(out_dir, "--out")
    tok = _load_tokenizer(tokenizer, config) if tokenizer else None
    source = os.path.join(load_dir, SOURCE_HF_CONFIG)
    base = read_json(source) if os.path.isfile(source) else None
    token_ids = qwen_common.tokenizer_token_ids(tok) if tok is not None else {}
    hf_config = arch.hf_config(config, token_ids, base)
    hf_config.dtype = HF_DTYPES[config.train.dtype]

    model = build_single_process_model(config)
    load_model_weights(model, load_dir)
    tensors = model_tensors(model)
    num_parameters = sum(t.numel() for t in tensors.values())
    log(f"export: {load_dir} as {arch.name}: {num_parameters / 1e6:.1f}M parameters")
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for bound in arch.table(config).bind(tensors):
        for name, value in zip(bound.hf, bound.to_hf([tensors[n] for n in bound.megavl])):
            writer.add(name, value)
    shards = writer.close()
    hf_config.save_pretrained(out_dir)
    for path in arch.remote_code_files():
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    write_json(os.path.join(out_dir, PREPROCESSOR_NAME), qwen_common.preprocessor_config(config))
    if tok is not None:
        tok.save_pretrained(out_dir)
    log(f"export: wrote {len(shards)} safetensors shard(s), config.json, {PREPROCESSOR_NAME}"
        f"{' and the tokenizer' if tok is not None else ''} to {out_dir}")

    result = ExportResult(arch.name, config, out_dir, num_parameters, shards)
    if verify is None:
        verify = num_parameters < AUTO_VERIFY_MAX_PARAMS
    if verify:
        # Verification reloads the checkpoint in fp32; free this copy first.
        del tensors, model
        gc.collect()
        result.verification = verify_conversion(
            out_dir, config, arch, load_dir, reserved=reserved_token_ids(hf_config.to_dict()),
            tolerance=tolerance,
        )
        log(result.verification.describe())
    return result
