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
    """config with --set overrides applied, then the generation layout: one pipeline stage, no
    sequence parallelism, and the processes split the model's tensors (dense models) or its
    experts (mixture-of-experts models: megatron's MoE layers under tensor parallelism need
    sequence parallelism, which one decoded token cannot be split for). Every process runs the
    same prompts."""
    data = config_to_dict(config)
    for text in overrides or []:
        apply_override(data, text)
    config = config_from_dict(data)
    experts = config.model.lm.moe.num_experts
    if experts and experts % world_size:
        raise ValueError(f"a mixture-of-experts model generates with its {experts} experts split over the "
                         f"processes; {world_size} processes do not divide them")
    tensor, expert = (1, world_size) if experts else (world_size, 1)
    config.parallel = ParallelConfig(tensor=tensor, pipeline=1, expert=expert, distributed_optimizer=False)
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
