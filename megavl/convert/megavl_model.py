"""The megavl side of a conversion: a whole (world-of-one) model and its tensors by name.

Converters never split tensors themselves. They fill or read a TP=1, PP=1
model in one process; megatron's dist_checkpointing reshards its checkpoint to
any layout that loads it later.
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch

from megavl.config import Config, ConfigError, ParallelConfig, config_from_dict, load_config
from megavl.convert.errors import ConversionError
from megavl.convert.files import CONFIG_FILE

# The language model's tensors: what an export of the language model alone writes.
LM_PREFIX = "language_model."

# The Transformer Engine spec fuses the layer norms into the following linear, and
# its state_dict names them after it. The mapping tables use the local spec's
# names; these prefixes translate TE's (the same pairs megavl.models.specs maps the
# other way when it writes checkpoints).
_TE_FUSED_NORMS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def single_process_config(config: Config, dtype: Optional[str] = None) -> Config:
    """config with the parallel layout reset to one process (and optionally another dtype)."""
    single = copy.deepcopy(config)
    single.parallel = ParallelConfig()
    if dtype is not None:
        single.train.dtype = dtype
    return single


def build_single_process_model(config: Config):
    """An uninitialised-weights VisionLanguageModel holding every tensor whole.

    Creates a world of one (gloo on loopback) unless a process group exists;
    refuses to run inside a model-parallel job, whose model would be split.
    """
    from megatron.core import parallel_state as ps

    from megavl.models.vlm import VisionLanguageModel
    from megavl.platform.distributed import init_distributed

    single = single_process_config(config)
    init_distributed(single)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    if tp != 1 or pp != 1:
        raise ConversionError(
            f"conversion runs in one process, but this process is part of a TP={tp} PP={pp} job; "
            "run the converter on its own (python tools/convert_*.py)"
        )
    model = VisionLanguageModel(single)
    model.eval()
    return model


def canonical_name(key: str) -> str:
    for fused, local in _TE_FUSED_NORMS.items():
        if fused in key:
            return key.replace(fused, local)
    return key


def model_tensors(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every weight of model (those under prefix) by its local-spec state_dict name
    (TE's extra state left out)."""
    tensors = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key.endswith("_extra_state") or not torch.is_tensor(value):
            continue
        name = canonical_name(key)
        if name.startswith(prefix):
            tensors[name] = value
    return tensors


def load_megavl_config(directory: str) -> Config:
    """The config of a megavl checkpoint: DIR/megavl_config.yaml, else the one a training
    checkpoint stores under "config"."""
    from megatron.core import dist_checkpointing

    from megavl.training.checkpoint import latest_checkpoint

    yaml_path = os.path.join(directory, CONFIG_FILE)
    try:
        if os.path.isfile(yaml_path):
            return load_config(yaml_path)
        folder = latest_checkpoint(directory) if os.path.isdir(directory) else None
    except (ConfigError, FileNotFoundError) as e:
        raise ConversionError(f"--load {directory}: {e}") from e
    if folder is None:
        raise ConversionError(
            f"--load {directory!r} is not a megavl checkpoint (no {CONFIG_FILE}, no 'latest' file "
            "and no dist_checkpointing metadata)"
        )
    stored = dist_checkpointing.load_common_state_dict(folder).get("config")
    if stored is None:
        raise ConversionError(
            f"--load {directory!r}: the checkpoint stores no config and the folder has no {CONFIG_FILE}; "
            f"put the model's YAML config there as {CONFIG_FILE}"
        )
    try:
        return config_from_dict(stored)
    except ConfigError as e:
        raise ConversionError(f"--load {directory}: the config stored in the checkpoint: {e}") from e
