"""megavl checkpoint -> Hugging Face folder (config.json, safetensors shards + index,
preprocessor_config.json for models that take images, optionally the tokenizer) that
transformers' from_pretrained loads.

One flow for every architecture description (megavl.convert.registry). The
checkpoint may have been saved under any TP/PP layout: it is loaded into a
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
from megavl.convert.architecture import Architecture
from megavl.convert.errors import ConversionError
from megavl.convert.fields import DTYPES
from megavl.convert.files import CONFIG_NAME, PREPROCESSOR_NAME, PROCESSOR_NAME, SOURCE_HF_CONFIG
from megavl.convert.hf_io import ShardedSafetensorsWriter, check_new_folder, parse_size, read_json, write_json
from megavl.convert.megavl_model import LM_PREFIX, build_single_process_model, load_megavl_config, model_tensors
from megavl.convert.registry import architecture_for_megavl
from megavl.convert.tokens import load_tokenizer_for, tokenizer_token_ids
from megavl.convert.verify import DEFAULT_TOLERANCE, VerifyResult, reserved_token_ids, wants_verification

# Small shards bound the memory the writer holds beside the model.
DEFAULT_MAX_SHARD_SIZE = "2GB"


@dataclass
class ExportResult:
    architecture: str
    config: Config
    out_dir: str
    num_parameters: int
    shards: list[str]
    verification: Optional[VerifyResult] = None


def _imported_config(load_dir: str, arch: Architecture) -> Optional[dict]:
    """The config.json the checkpoint was imported from, when it is one of arch's:
    the fields of another architecture's mean nothing here."""
    path = os.path.join(load_dir, SOURCE_HF_CONFIG)
    base = read_json(path) if os.path.isfile(path) else None
    return base if base and arch.name in (base.get("architectures") or []) else None


def _write_shards(table, tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int,
                 extra: dict[str, torch.Tensor]) -> list[str]:
    """Maps the tensors and writes them, then the architecture's extra tensors (which no megavl
    tensor maps to), shard by shard; returns the shard paths."""
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for bound in table.bind(tensors):
        for name, value in zip(bound.hf, bound.to_hf([tensors[n] for n in bound.megavl])):
            writer.add(name, value)
    for name, value in extra.items():
        writer.add(name, value)
    return writer.close()


def generation_config(tokenizer, config: Config):
    """How transformers' generate() answers as megavl's generation does (megavl/eval/generation.py):
    an answer ends at <|im_end|> or <|endoftext|>, and the rows of an embedding table padded
    beyond the tokenizer (ids no text decodes to) are never drawn."""
    from transformers import GenerationConfig

    from megavl.data.conversation import pad_token_id, special_token_id
    from megavl.data.tokenizer import ENDOFTEXT, IM_END

    padded = list(range(len(tokenizer), config.model.lm.vocab_size))
    return GenerationConfig(
        eos_token_id=[special_token_id(tokenizer, IM_END), special_token_id(tokenizer, ENDOFTEXT)],
        pad_token_id=pad_token_id(tokenizer),
        suppress_tokens=padded or None,
    )


@torch.no_grad()
def export_to_hf(
    load_dir: str,
    out_dir: str,
    tokenizer: Optional[str] = None,
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    architecture: Optional[str] = None,
    language_model_only: bool = False,
    verify: Optional[bool] = None,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Writes the megavl model in load_dir as a Hugging Face model folder out_dir.

    architecture=None picks the supported architecture that reproduces the
    model (with language_model_only, one that writes the language model alone,
    e.g. Qwen3MoeForCausalLM), and refuses (UnsupportedModelError, with the
    reasons) when none does. verify=None verifies models under 2e9 parameters.
    """
    from megavl.training.checkpoint import load_model_weights

    config = load_megavl_config(load_dir)
    arch = architecture_for_megavl(config, architecture, language_model_only)
    max_shard_bytes = parse_size(max_shard_size)
    check_new_folder(out_dir, "--out")
    tok = load_tokenizer_for(tokenizer, config) if tokenizer else None
    token_ids = tokenizer_token_ids(tok) if tok is not None else {}
    hf_config = arch.hf_config(config, token_ids, _imported_config(load_dir, arch))
    hf_config.dtype = DTYPES[config.train.dtype]

    model = build_single_process_model(config)
    # A language-model-only export leaves the vision-only adapters out, so a
    # checkpoint without them exports as well.
    load_model_weights(model, load_dir, allow_fresh_adapters=arch.language_model_only)
    tensors = model_tensors(model, prefix=LM_PREFIX if arch.language_model_only else "")
    num_parameters = sum(t.numel() for t in tensors.values())
    what = "the LM of " if arch.language_model_only else ""
    log(f"export: {what}{load_dir} as {arch.name}: {num_parameters / 1e6:.1f}M parameters")
    dtype = next(iter(tensors.values())).dtype
    extra = {name: value.to(dtype) for name, value in arch.extra_hf_tensors(config).items()}
    shards = _write_shards(arch.table(config), tensors, out_dir, max_shard_bytes, extra)
    hf_config.save_pretrained(out_dir)
    written = [f"{len(shards)} safetensors shard(s)", CONFIG_NAME]
    for path in arch.remote_code_files():
        shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    preprocessor = arch.preprocessor_config(config)
    if preprocessor is not None:
        write_json(os.path.join(out_dir, PREPROCESSOR_NAME), preprocessor)
        written.append(PREPROCESSOR_NAME)
    if tok is not None:
        tok.save_pretrained(out_dir)
        written.append("the tokenizer")
        generation_config(tok, config).save_pretrained(out_dir)
        written.append("generation_config.json")
        processor = arch.processor_config(config) if preprocessor is not None else None
        if processor is not None:
            write_json(os.path.join(out_dir, PROCESSOR_NAME), processor)
            written.append(PROCESSOR_NAME)
    log(f"export: wrote {', '.join(written[:-1])} and {written[-1]} to {out_dir}")

    result = ExportResult(arch.name, config, out_dir, num_parameters, shards)
    if wants_verification(verify, num_parameters):
        # Verification reloads the checkpoint in fp32; free this copy first.
        del tensors, model
        gc.collect()
        result.verification = arch.verify(
            [out_dir], config, load_dir, reserved=reserved_token_ids(hf_config.to_dict()), tolerance=tolerance
        )
        log(result.verification.describe())
    return result


def export_language_model(load_dir: str, out_dir: str, **options) -> ExportResult:
    """export_to_hf of the language model alone (e.g. a Qwen3-MoE LM imported with a vision tower)."""
    return export_to_hf(load_dir, out_dir, language_model_only=True, **options)
