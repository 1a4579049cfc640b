"""A model for generation from any megavl checkpoint: a training checkpoint (root or one
iter_* folder) or a converted one (with megavl_config.yaml), saved under any layout.

The checkpoint's config describes the model; the layout is this job's: tensor
parallelism over all its processes, one pipeline stage, no sequence parallelism
(dist_checkpointing reshards the weights to it).
"""

from __future__ import annotations

from typing import Optional

from megavl.config import Config, ParallelConfig, config_from_dict, config_to_dict
from megavl.config.loading import apply_override


def generation_config(config: Config, world_size: int, overrides: Optional[list[str]] = None) -> Config:
    """config with --set overrides applied, then the generation layout: tensor parallelism over
    the world, one pipeline stage, no expert parallelism, no sequence parallelism."""
    data = config_to_dict(config)
    for text in overrides or []:
        apply_override(data, text)
    config = config_from_dict(data)
    moe = config.model.lm.moe.num_experts > 0
    # Experts are split over the tensor-parallel ranks as the dense layers are.
    config.parallel = ParallelConfig(tensor=world_size, pipeline=1, expert=1,
                                     expert_tensor=world_size if moe else 1, distributed_optimizer=False)
    return config


def load_for_generation(load_dir: str, tokenizer_path: Optional[str] = None, overrides: Optional[list[str]] = None):
    """(model, config, platform, tokenizer) ready to generate; call under torchrun or alone."""
    from megavl.convert.megavl_model import load_megavl_config
    from megavl.data.tokenizer import check_tokenizer_matches_model, load_tokenizer
    from megavl.models.build import build_model
    from megavl.platform.distributed import init_distributed, set_seed, world_size_from_env
    from megavl.platform.features import detect
    from megavl.training.checkpoint import load_model_weights

    config = generation_config(load_megavl_config(load_dir), world_size_from_env(), overrides)
    init_distributed(config)
    set_seed(config.train.seed)
    platform = detect()
    model = build_model(config)
    load_model_weights(model, load_dir)
    if platform.cuda:
        model.cuda()
    model.eval()
    tokenizer = load_tokenizer(tokenizer_path or config.data.tokenizer)
    check_tokenizer_matches_model(tokenizer, config)
    return model, config, platform, tokenizer
