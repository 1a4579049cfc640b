"""Cross-field validation: can this config run on this many processes?

Every check runs and every failure is collected, so one call reports all
problems, each naming the field, its value and what would be valid. Runs
before any process group exists, so a bad setting fails in seconds.
"""

import dataclasses
import typing
from typing import Any, Literal, Optional, Union

from megavl.config.errors import report_problems
from megavl.config.layout import model_parallel_size, pipeline_split
from megavl.config.loading import build_section, field_types
from megavl.config.schema import TRAINABLE_PARTS, Config, ResolutionConfig, lm_head_dim
from megavl.config.towers import TOWERS, tower_problems, tower_traits


class _Checks:
    """Collects every failed check so the user can fix them in one pass."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def require(self, ok: bool, message: str) -> bool:
        if not ok:
            self.problems.append(message)
        return ok

    def at_least(self, name: str, value: Any, low: Union[int, float]) -> bool:
        return self.require(value >= low, f"{name} = {value!r}: must be >= {low}")

    def positive(self, name: str, value: Any) -> bool:
        return self.require(value > 0, f"{name} = {value!r}: must be > 0")

    def probability(self, name: str, value: float) -> bool:
        return self.require(0.0 <= value <= 1.0, f"{name} = {value!r}: must be in [0, 1]")

    def divisible(self, name: str, value: int, by_name: str, by: int) -> bool:
        # A non-positive divisor has its own message elsewhere.
        if by < 1:
            return False
        return self.require(
            value % by == 0,
            f"{name} = {value}: must be divisible by {by_name} ({by})",
        )


def _check_choices(c: _Checks, section: Any, prefix: str) -> None:
    """Every Literal field of section (and its sub-sections) holds one of its values."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, path = getattr(section, f.name), f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_choices(c, value, path)
        else:
            hint = hints[f.name]
            optional = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
            if optional:  # Optional[Literal[...]]: None, or one of the values
                if value is None:
                    continue
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is Literal:
                allowed = typing.get_args(hint)
                c.require(value in allowed, f"{path} = {value!r}: must be one of {', '.join(allowed)}"
                          + (" (or null)" if optional else ""))


def _head_dim_checks(c: _Checks, section: str, hidden: int, heads: int, tp: int,
                     head_dim: Optional[int] = None) -> Optional[int]:
    """Checks shared by both transformers; returns the head width when it is sound. head_dim: a
    width set apart from the hidden size (model.lm.head_dim), else hidden / heads."""
    ok = c.at_least(f"{section}.hidden_size", hidden, 1)
    ok = c.at_least(f"{section}.num_attention_heads", heads, 1) and ok
    if ok:
        c.divisible(f"{section}.num_attention_heads", heads, "parallel.tensor", tp)
    if head_dim is None:
        if not ok or not c.divisible(f"{section}.hidden_size", hidden, f"{section}.num_attention_heads", heads):
            return None
        head_dim = hidden // heads
        width = f"{section}.hidden_size / {section}.num_attention_heads = {hidden}/{heads} = head dim {head_dim}"
        fix = ""
    else:
        if not c.at_least(f"{section}.head_dim", head_dim, 2):
            return None
        width, fix = f"{section}.head_dim = {head_dim}", " (or null for hidden_size / num_attention_heads)"
    # Rotary embeddings rotate pairs of channels.
    if not c.require(head_dim % 2 == 0, f"{width}: must be even for rotary embeddings{fix}"):
        return None
    return head_dim if ok else None


def _check_vision(c: _Checks, config: Config) -> None:
    v = config.model.vision
    tp = config.parallel.tensor
    s = "model.vision"
    c.at_least(f"{s}.num_layers", v.num_layers, 1)
    _head_dim_checks(c, s, v.hidden_size, v.num_attention_heads, tp)
    if c.at_least(f"{s}.ffn_hidden_size", v.ffn_hidden_size, 1):
        c.divisible(f"{s}.ffn_hidden_size", v.ffn_hidden_size, "parallel.tensor", tp)
    patch_ok = c.at_least(f"{s}.patch_size", v.patch_size, 1)
    c.at_least(f"{s}.temporal_patch_size", v.temporal_patch_size, 1)
    c.at_least(f"{s}.in_channels", v.in_channels, 1)
    merge_ok = c.at_least(f"{s}.spatial_merge_size", v.spatial_merge_size, 1)
    c.problems += tower_problems(config)
    if patch_ok and merge_ok and v.kind in TOWERS and (tower_traits(v).windows or tower_traits(v).compresses):
        # Windows must hold whole merged tokens, or merging would straddle window boundaries; a
        # compressing tower's windows come before its compressor, so whole patches suffice (SAM's
        # 14-patch windows under a 4 x 4 compressor).
        unit = v.patch_size * (1 if tower_traits(v).compresses else v.spatial_merge_size)
        c.require(
            v.window_size > 0 and v.window_size % unit == 0,
            f"{s}.window_size = {v.window_size}: must be a positive multiple of "
            + (f"{s}.patch_size = {unit}" if tower_traits(v).compresses
               else f"{s}.patch_size * {s}.spatial_merge_size = {unit}"),
        )
    bad = [i for i in v.full_attention_layers if not 0 <= i < v.num_layers]
    c.require(
        not bad or (v.kind in TOWERS and not tower_traits(v).windows),
        f"{s}.full_attention_layers = {v.full_attention_layers}: indices {bad} are "
        f"outside [0, {v.num_layers}) (0-based, {s}.num_layers = {v.num_layers})",
    )
    c.positive(f"{s}.norm_eps", v.norm_eps)
    c.positive(f"{s}.rope_theta", v.rope_theta)


def _check_adapter(c: _Checks, config: Config) -> None:
    a = config.model.adapter
    if a.kind == "pixel_shuffle":
        # Its one linear is split by output columns over TP.
        c.divisible("model.lm.hidden_size", config.model.lm.hidden_size, "parallel.tensor", config.parallel.tensor)
    if a.ffn_hidden_size is None:
        return
    name = "model.adapter.ffn_hidden_size"
    if c.at_least(name, a.ffn_hidden_size, 1):
        c.divisible(name, a.ffn_hidden_size, "parallel.tensor", config.parallel.tensor)


def _check_layer_backend(c: _Checks, config: Config) -> None:
    """model.layer_backend: te must be installed here and able to build the model."""
    # Imported here: the platform package builds on the config, not the other way round.
    from megavl.platform.features import detect, te_layers_refusal

    if config.model.layer_backend != "te":
        return
    if not detect().transformer_engine:
        c.require(False, "model.layer_backend = te: Transformer Engine is not installed in this environment "
                         "(pip install transformer-engine[pytorch], or use auto / local)")
    refusal = te_layers_refusal(config)
    c.require(refusal is None, f"model.layer_backend = te: {refusal}; set both ranks to 0, or use auto / local")


def _check_lm(c: _Checks, config: Config) -> None:
    m = config.model.lm
    tp = config.parallel.tensor
    s = "model.lm"
    c.at_least(f"{s}.num_layers", m.num_layers, 1)
    head_dim = _head_dim_checks(c, s, m.hidden_size, m.num_attention_heads, tp, m.head_dim)
    if c.at_least(f"{s}.num_query_groups", m.num_query_groups, 1):
        c.divisible(f"{s}.num_query_groups", m.num_query_groups, "parallel.tensor", tp)
        if m.num_attention_heads >= 1:
            c.divisible(
                f"{s}.num_attention_heads", m.num_attention_heads,
                f"{s}.num_query_groups", m.num_query_groups,
            )
    if c.at_least(f"{s}.ffn_hidden_size", m.ffn_hidden_size, 1):
        c.divisible(f"{s}.ffn_hidden_size", m.ffn_hidden_size, "parallel.tensor", tp)
    vocab_ok = c.at_least(f"{s}.vocab_size", m.vocab_size, 1)
    if vocab_ok:  # megatron's vocab-parallel embedding and output layer split it evenly over TP
        c.divisible(f"{s}.vocab_size", m.vocab_size, "parallel.tensor", tp)
    if m.rope == "mrope":
        c.require(
            len(m.mrope_section) == 3 and all(x >= 0 for x in m.mrope_section),
            f"{s}.mrope_section = {m.mrope_section}: must be 3 non-negative "
            "entries (temporal, height, width)",
        )
        if head_dim is not None and m.mrope_layout == "interleaved" and len(m.mrope_section) == 3:
            # Height takes frequencies 1, 4, 7, ... and width 2, 5, 8, ...: each axis's last one
            # must still be a frequency of the head.
            _, height, width = m.mrope_section
            c.require(
                3 * height - 2 < head_dim // 2 and 3 * width - 1 < head_dim // 2,
                f"{s}.mrope_section = {m.mrope_section} with {s}.mrope_layout = interleaved: height and width "
                f"take every third of the head's {head_dim // 2} frequencies, so each may have at most "
                f"{(head_dim // 2 + 1) // 3} (height) and {head_dim // 2 // 3} (width)",
            )
        if head_dim is not None:
            c.require(
                sum(m.mrope_section) == head_dim // 2,
                f"{s}.mrope_section = {m.mrope_section}: sums to {sum(m.mrope_section)}, "
                f"must sum to head_dim // 2 = {head_dim // 2} ("
                + (f"{s}.head_dim = {head_dim})" if m.head_dim is not None else
                   f"{s}.hidden_size {m.hidden_size} / num_attention_heads {m.num_attention_heads} = {head_dim})"),
            )
    c.require(
        m.rope == "mrope" or m.mrope_layout == "sections",
        f"{s}.mrope_layout = {m.mrope_layout}: lays out multimodal RoPE ({s}.rope = mrope), not {m.rope}",
    )
    c.require(
        not (m.rope == "mrope" and m.image_positions == "sequential"),
        f"{s}.image_positions = sequential: multimodal RoPE ({s}.rope = mrope) spreads image tokens over "
        f"height and width; number them sequentially with {s}.rope = 1d, or keep spatial positions",
    )
    c.positive(f"{s}.rope_theta", m.rope_theta)
    if m.rope_scaling_factor is not None:
        c.require(m.rope == "1d", f"{s}.rope_scaling_factor = {m.rope_scaling_factor}: Llama 3's frequency scaling "
                                  f"applies to 1-D RoPE ({s}.rope = 1d), not {m.rope}")
        c.at_least(f"{s}.rope_scaling_factor", m.rope_scaling_factor, 1.0)
    c.positive(f"{s}.norm_eps", m.norm_eps)
    c.at_least(f"{s}.max_position_embeddings", m.max_position_embeddings, 1)
    if vocab_ok:
        c.require(
            0 <= m.image_token_id < m.vocab_size,
            f"{s}.image_token_id = {m.image_token_id}: must be in "
            f"[0, {s}.vocab_size = {m.vocab_size})",
        )


def _check_moe(c: _Checks, config: Config) -> None:
    m = config.model.lm.moe
    s = "model.lm.moe"
    if not c.at_least(f"{s}.num_experts", m.num_experts, 0) or m.num_experts == 0:
        return
    c.require(
        1 <= m.top_k <= m.num_experts,
        f"{s}.top_k = {m.top_k}: must be in [1, {s}.num_experts = {m.num_experts}]",
    )
    ffn = m.ffn_hidden_size if m.ffn_hidden_size is not None else config.model.lm.ffn_hidden_size
    if c.at_least(f"{s}.ffn_hidden_size", ffn, 1):
        c.divisible(f"{s}.ffn_hidden_size", ffn, "parallel.expert_tensor", max(1, config.parallel.expert_tensor))
    if m.shared_expert_ffn_hidden_size is not None:
        c.at_least(f"{s}.shared_expert_ffn_hidden_size", m.shared_expert_ffn_hidden_size, 1)
    layers = config.model.lm.num_layers
    bad = [i for i in m.dense_layers if not 0 <= i < layers]
    c.require(not bad, f"{s}.dense_layers = {m.dense_layers}: indices {bad} are outside [0, {layers})")
    c.require(
        len(set(m.dense_layers)) < layers,
        f"{s}.dense_layers = {m.dense_layers}: every layer is dense; set num_experts = 0 instead",
    )
    c.at_least(f"{s}.aux_loss_coeff", m.aux_loss_coeff, 0.0)
    c.at_least(f"{s}.z_loss_coeff", m.z_loss_coeff, 0.0)


def _check_vision_lora(c: _Checks, config: Config) -> None:
    lora = config.model.lm.vision_lora
    s = "model.lm.vision_lora"
    ranks_ok = c.at_least(f"{s}.mlp_rank", lora.mlp_rank, 0)
    ranks_ok = c.at_least(f"{s}.attn_rank", lora.attn_rank, 0) and ranks_ok
    if not ranks_ok or (lora.mlp_rank == 0 and lora.attn_rank == 0):
        return
    c.positive(f"{s}.alpha", lora.alpha)
    if c.at_least(f"{s}.weight_decay", lora.weight_decay, 0.0) and lora.weight_decay > 0:
        c.require(
            config.train.weight_decay > 0,
            f"{s}.weight_decay = {lora.weight_decay}: needs train.weight_decay > 0 "
            "(the adapters' decay is applied as a multiple of it)",
        )
    if config.model.lm.moe.num_experts and lora.mlp_rank:
        c.require(
            config.parallel.expert_tensor == 1,
            f"parallel.expert_tensor = {config.parallel.expert_tensor}: vision LoRA on experts "
            "supports expert_tensor = 1 only (set model.lm.vision_lora.mlp_rank = 0 otherwise)",
        )


def _check_pipeline_split(c: _Checks, config: Config) -> None:
    if config.parallel.pipeline < 1 or config.model.lm.num_layers < 1:
        return  # reported by the size checks
    _, problem = pipeline_split(config)
    c.require(problem is None, problem)


def _check_parallel(c: _Checks, config: Config, world_size: int) -> Optional[int]:
    """Returns the data-parallel size when it is well defined."""
    p = config.parallel
    sizes_ok = True
    for name in ("tensor", "pipeline", "expert", "context"):
        sizes_ok = c.at_least(f"parallel.{name}", getattr(p, name), 1) and sizes_ok
    experts = config.model.lm.moe.num_experts
    c.at_least("parallel.expert_tensor", p.expert_tensor, 1)
    if experts == 0:
        for name in ("expert", "expert_tensor"):
            c.require(
                getattr(p, name) <= 1,
                f"parallel.{name} = {getattr(p, name)}: expert parallelism needs a mixture-of-experts "
                "LM, and model.lm has no experts (model.lm.moe.num_experts = 0); use 1",
            )
    else:
        if p.expert >= 1:
            c.divisible("model.lm.moe.num_experts", experts, "parallel.expert", p.expert)
        c.require(
            p.tensor == 1 or p.sequence_parallel,
            f"parallel.sequence_parallel = False with parallel.tensor = {p.tensor}: "
            "mixture-of-experts layers with tensor parallelism need sequence parallelism; set it true",
        )
        expert_grid = p.expert * p.expert_tensor * p.pipeline
        if world_size >= 1 and expert_grid >= 1:
            c.require(
                world_size % expert_grid == 0,
                f"world size {world_size}: must be divisible by parallel.expert * parallel.expert_tensor "
                f"* parallel.pipeline = {p.expert}*{p.expert_tensor}*{p.pipeline} = {expert_grid}",
            )
    c.require(
        p.context == 1,
        f"parallel.context = {p.context}: context parallelism is not supported "
        "by this model yet; use 1",
    )
    _check_pipeline_split(c, config)
    if p.sequence_parallel:
        c.require(
            p.tensor > 1,
            f"parallel.sequence_parallel = True: requires parallel.tensor > 1 "
            f"(got {p.tensor})",
        )
        if p.tensor >= 1:
            c.divisible("train.seq_length", config.train.seq_length, "parallel.tensor", p.tensor)
    if not c.at_least("world size", world_size, 1) or not sizes_ok:
        return None
    mp = model_parallel_size(config)
    if not c.require(
        world_size % mp == 0,
        f"world size {world_size}: must be divisible by parallel.tensor * "
        f"parallel.pipeline * parallel.context = {p.tensor}*{p.pipeline}*{p.context} = {mp}",
    ):
        return None
    return world_size // mp


def _check_train(c: _Checks, config: Config, dp: Optional[int]) -> None:
    t = config.train
    c.positive("train.steps", t.steps)
    c.at_least("train.seed", t.seed, 0)
    mbs_ok = c.at_least("train.micro_batch_size", t.micro_batch_size, 1)
    gbs_ok = c.at_least("train.global_batch_size", t.global_batch_size, 1)
    if mbs_ok and gbs_ok and dp is not None:
        c.require(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"train.global_batch_size = {t.global_batch_size}: must be divisible by "
            f"train.micro_batch_size * data-parallel size = {t.micro_batch_size}*{dp} "
            f"= {t.micro_batch_size * dp}",
        )
    if c.positive("train.seq_length", t.seq_length):
        c.require(
            t.seq_length <= config.model.lm.max_position_embeddings,
            f"train.seq_length = {t.seq_length}: must be <= "
            f"model.lm.max_position_embeddings ({config.model.lm.max_position_embeddings})",
        )
    if c.at_least("train.min_lr", t.min_lr, 0):
        c.require(
            t.lr >= t.min_lr,
            f"train.lr = {t.lr}: must be >= train.min_lr ({t.min_lr})",
        )
    if c.at_least("train.warmup_steps", t.warmup_steps, 0) and t.warmup_fraction is None:
        c.require(
            t.warmup_steps <= t.steps,
            f"train.warmup_steps = {t.warmup_steps}: must be <= train.steps ({t.steps})",
        )
    if t.warmup_fraction is not None:
        c.probability("train.warmup_fraction", t.warmup_fraction)
    if t.lr_decay_style == "WSD" and c.require(
        0.0 < t.wsd_decay_fraction <= 1.0,
        f"train.wsd_decay_fraction = {t.wsd_decay_fraction}: must be in (0, 1]",
    ) and t.steps > 0:
        c.require(
            t.warmup() + t.wsd_decay_steps() <= t.steps,
            f"train.wsd_decay_fraction = {t.wsd_decay_fraction}: its {t.wsd_decay_steps()} annealing steps and "
            f"the {t.warmup()} warmup steps must fit in train.steps ({t.steps})",
        )
    c.at_least("train.weight_decay", t.weight_decay, 0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        c.require(0.0 <= value < 1.0, f"train.{name} = {value}: must be in [0, 1)")
    c.positive("train.adam_eps", t.adam_eps)
    c.at_least("train.clip_grad", t.clip_grad, 0)
    c.require(0.0 <= t.dropout < 1.0, f"train.dropout = {t.dropout}: must be in [0, 1)")
    c.require(t.init_std > 0.0, f"train.init_std = {t.init_std}: must be > 0")
    c.at_least("train.eval_interval", t.eval_interval, 1)
    c.at_least("train.eval_steps", t.eval_steps, 1)
    _check_muon(c, config)
    _check_task_eval(c, config)


def _check_task_eval(c: _Checks, config: Config) -> None:
    e, p = config.train.task_eval, config.parallel
    if e.interval is None:
        return
    c.at_least("train.task_eval.interval", e.interval, 1)
    for name in ("samples", "max_new_tokens", "batch_size"):
        c.at_least(f"train.task_eval.{name}", getattr(e, name), 1)
    c.require(bool(config.data.val_path),
              "train.task_eval.interval is set but data.val_path is not: task evaluation reads the validation set")
    # Generation runs the model whole along the pipeline and decodes one token at a time.
    instead = ("set train.task_eval.interval=null and evaluate the checkpoints with tools/evaluate.py, "
               "which loads them on one stage")
    c.require(p.pipeline == 1, f"train.task_eval.interval = {e.interval} with parallel.pipeline = {p.pipeline}: "
              f"generation during training needs one pipeline stage; {instead}")
    c.require(not p.sequence_parallel, f"train.task_eval.interval = {e.interval} with parallel.sequence_parallel = "
              f"true: one decoded token cannot be split along the sequence; {instead}")


def _check_muon(c: _Checks, config: Config) -> None:
    m = config.train.muon
    c.require(0.0 <= m.momentum < 1.0, f"train.muon.momentum = {m.momentum}: must be in [0, 1)")
    c.at_least("train.muon.ns_steps", m.ns_steps, 1)
    c.positive("train.muon.extra_scale_factor", m.extra_scale_factor)
    c.positive("train.muon.lr_mult", m.lr_mult)


def check_resolution(c: "_Checks", r: ResolutionConfig, config: Config, prefix: str = "data.resolution") -> None:
    """Also used for a dataset's override, with the dataset named in prefix."""
    v = config.model.vision
    unit = v.patch_size * v.spatial_merge_size
    if c.at_least(f"{prefix}.min_pixels", r.min_pixels, 1):
        c.require(
            r.min_pixels <= r.max_pixels,
            f"{prefix}.min_pixels = {r.min_pixels}: must be <= {prefix}.max_pixels ({r.max_pixels})",
        )
    # An image must fit at least one merged token.
    c.require(
        r.max_pixels >= unit * unit,
        f"{prefix}.max_pixels = {r.max_pixels}: must be >= ({v.patch_size}*"
        f"{v.spatial_merge_size})**2 = {unit * unit}, one merged vision token",
    )
    if c.positive(f"{prefix}.fixed_tokens", r.fixed_tokens):
        from megavl.data.resolution import fixed_grid

        try:
            fixed_grid(r.fixed_tokens)
        except ValueError as e:
            c.require(False, f"{prefix}.{e}")
    # A tile size only constrains the tiling mode: a fixed-size tower's config keeps the default
    # tile_size, which need not divide by its patch and merge sizes.
    if c.positive(f"{prefix}.tile_size", r.tile_size) and r.mode == "tiling":
        c.require(
            r.tile_size % unit == 0,
            f"{prefix}.tile_size = {r.tile_size}: must be a multiple of patch_size*spatial_merge_size = {unit}",
        )
    if c.at_least(f"{prefix}.min_tiles", r.min_tiles, 1):
        c.require(
            r.max_tiles >= r.min_tiles,
            f"{prefix}.max_tiles = {r.max_tiles}: must be >= {prefix}.min_tiles ({r.min_tiles})",
        )


def check_resolution_override(override: Any, config: Config, where: str) -> list[str]:
    """Problems with a dataset's ``subflavors.resolution`` (fields over data.resolution)."""
    prefix = f"{where}: subflavors.resolution"
    if not isinstance(override, dict):
        return [f"{prefix} = {override!r}: expected a mapping of {', '.join(field_types(ResolutionConfig))}"]
    problems: list[str] = []
    merged = {**dataclasses.asdict(config.data.resolution), **override}
    resolution = build_section(ResolutionConfig, merged, prefix, problems)
    if not problems:
        c = _Checks()
        _check_choices(c, resolution, prefix)
        check_resolution(c, resolution, config, prefix)
        problems += c.problems
    return problems


def _check_data(c: _Checks, config: Config) -> None:
    d = config.data
    c.at_least("data.num_workers", d.num_workers, 0)
    check_resolution(c, d.resolution, config)
    s = d.max_pixels_schedule
    if c.at_least("data.max_pixels_schedule.start_max_pixels", s.start_max_pixels, 0) and s.start_max_pixels:
        c.require(
            s.start_max_pixels <= d.resolution.max_pixels,
            f"data.max_pixels_schedule.start_max_pixels = {s.start_max_pixels}: must be <= "
            f"data.resolution.max_pixels ({d.resolution.max_pixels})",
        )
        c.require(0.0 < s.fraction <= 1.0, f"data.max_pixels_schedule.fraction = {s.fraction}: must be in (0, 1]")
        c.positive("data.max_pixels_schedule.stages", s.stages)
    c.positive("data.max_image_pixels", d.max_image_pixels)
    c.probability("data.conversation_mask_prob", d.conversation_mask_prob)
    c.probability("data.grounding_conversation_mask_prob", d.grounding_conversation_mask_prob)
    c.at_least("data.max_images_per_pack", d.max_images_per_pack, 1)
    c.at_least("data.max_vision_tokens_per_pack", d.max_vision_tokens_per_pack, 0)
    c.positive("data.packing_buffer_size", d.packing_buffer_size)
    c.positive("data.shuffle_buffer_size", d.shuffle_buffer_size)
    c.positive("data.max_samples_per_sequence", d.max_samples_per_sequence)
    c.probability("data.max_failure_rate", d.max_failure_rate)
    c.positive("data.failure_check_min_samples", d.failure_check_min_samples)


def _check_parts(c: _Checks, config: Config) -> None:
    parts = config.train.parts
    names = TRAINABLE_PARTS
    for name in names:
        part = getattr(parts, name)
        c.positive(f"train.parts.{name}.lr_mult", part.lr_mult)
        c.at_least(f"train.parts.{name}.wd_mult", part.wd_mult, 0)
    c.require(
        any(getattr(parts, name).train for name in names),
        "train.parts: every part has train = false; at least one part must train",
    )
    last, layers = parts.vision_last_layers, config.model.vision.num_layers
    if last is not None:
        c.require(
            0 <= last <= layers,
            f"train.parts.vision_last_layers = {last}: must be in [0, model.vision.num_layers = {layers}]",
        )
    if config.model.lm.tie_embeddings:
        embeddings, output = parts.lm_embeddings, parts.output_layer
        c.require(
            (embeddings.train, embeddings.lr_mult, embeddings.wd_mult) == (output.train, output.lr_mult, output.wd_mult),
            f"train.parts.output_layer = {vars(output)} differs from train.parts.lm_embeddings = {vars(embeddings)}, "
            "but model.lm.tie_embeddings = true makes them one tensor: give both the same settings",
        )


def _check_embedding_rows(c: _Checks, config: Config) -> None:
    """train.embedding_rows_from: the rows of token ids below it must come out of training unchanged."""
    first = config.train.embedding_rows_from
    if first is None:
        return
    name, vocab = "train.embedding_rows_from", config.model.lm.vocab_size
    c.require(0 < first < vocab, f"{name} = {first}: must be in (0, model.lm.vocab_size = {vocab}), "
                                 "the first token id whose embedding and output-layer rows train")
    parts = config.train.parts
    # Tied embeddings are one tensor, which train.parts.lm_embeddings describes.
    names = ["lm_embeddings"] if config.model.lm.tie_embeddings else ["lm_embeddings", "output_layer"]
    trained = [part for part in names if getattr(parts, part).train]
    c.require(bool(trained), f"{name} = {first}: needs train.parts.lm_embeddings.train or "
                             "train.parts.output_layer.train = true; neither trains, so no row would")
    if config.train.weight_decay > 0:
        for part in trained:
            wd_mult = getattr(parts, part).wd_mult
            c.require(wd_mult == 0, f"train.parts.{part}.wd_mult = {wd_mult} with {name} = {first}: must be 0 "
                                    f"(or train.weight_decay 0); decoupled weight decay would shrink the rows "
                                    f"below {first} that must stay unchanged")


def _fp8_gemm_multiple(recipe: str) -> int:
    """The multiple every dimension of an FP8 GEMM must be, under train.fp8_recipe = recipe.

    Transformer Engine asserts before each FP8 GEMM that the input's and the weight's last
    dimension (in_features) is a multiple of 16 and the product of the others (the tokens; the
    weight's out_features) one of 8 (``utils.assert_dim_for_fp8_exec``); the backward GEMMs run on
    the transposes, where out_features and the tokens are the inner dimension, so all three are
    held to 16. MXFP8 scales blocks of 32 elements along both dimensions
    (``MXFP8Quantizer.is_quantizable``). megatron-core pads the experts' tokens to the same
    multiples (``fp8_utils.get_fp8_align_size``).
    """
    return 32 if recipe == "mxfp8" else 16


def _fp8_gemm_widths(config: Config, tower: str) -> list[tuple]:
    """(field, its setting, the GEMM dimension it sets, that dimension's width, the split[, how to
    fix it]) for the FP8 linears of tower ("lm" or "vision"); the width is split over split
    tensor-parallel ranks."""
    tp = max(1, config.parallel.tensor)
    if tower == "vision":
        v = config.model.vision
        widths = [
            ("model.vision.hidden_size", f"{v.hidden_size}", "the input of the vision tower's linear_qkv and "
             "linear_fc1 and the output of its linear_proj and linear_fc2", v.hidden_size, 1),
            ("model.vision.hidden_size", f"{v.hidden_size}", "the input of the vision tower's linear_proj",
             v.hidden_size, tp),
            ("model.vision.ffn_hidden_size", f"{v.ffn_hidden_size}", "the input of the vision MLP's linear_fc2",
             v.ffn_hidden_size, tp),
        ]
        if v.kind in TOWERS and tower_traits(v).compresses:
            s = v.window_stage
            widths += [
                ("model.vision.window_stage.hidden_size", f"{s.hidden_size}", "the input of the window stage's "
                 "linear_qkv and linear_fc1 and the output of its linear_proj and linear_fc2", s.hidden_size, 1),
                ("model.vision.window_stage.hidden_size", f"{s.hidden_size}", "the input of the window stage's "
                 "linear_proj", s.hidden_size, tp),
                ("model.vision.window_stage.ffn_hidden_size", f"{s.ffn_hidden_size}", "the input of the window "
                 "stage's linear_fc2", s.ffn_hidden_size, tp),
            ]
        return widths
    lm, moe = config.model.lm, config.model.lm.moe
    widths = [
        ("model.lm.hidden_size", f"{lm.hidden_size}", "the input of linear_qkv and linear_fc1 and the output "
         "of linear_proj and linear_fc2", lm.hidden_size, 1),
        ("model.lm.hidden_size", f"{lm.hidden_size}", "the input of linear_proj", lm.hidden_size, tp),
    ]
    if lm.num_attention_heads >= 1 and (lm.head_dim or lm.hidden_size % lm.num_attention_heads == 0):
        head_dim = lm_head_dim(lm)
        widths.append((
            "model.lm.num_query_groups",
            f"{lm.num_query_groups} (with {lm.num_attention_heads} heads of {head_dim})",
            "the output of linear_qkv, (num_attention_heads + 2 * num_query_groups) * head dim,",
            (lm.num_attention_heads + 2 * lm.num_query_groups) * head_dim, tp,
        ))
        widths[-1] += ("make the head dim (" + ("model.lm.head_dim" if lm.head_dim else
                                                "model.lm.hidden_size / num_attention_heads")
                       + ") a multiple of {multiple}",)
    # Dense MLPs: every layer without experts, or the layers moe.dense_layers keeps dense.
    if moe.num_experts == 0 or moe.dense_layers:
        widths.append(("model.lm.ffn_hidden_size", f"{lm.ffn_hidden_size}", "the input of the dense MLP's "
                       "linear_fc2", lm.ffn_hidden_size, tp))
    if moe.num_experts:
        ffn = moe.ffn_hidden_size if moe.ffn_hidden_size is not None else lm.ffn_hidden_size
        widths.append(("model.lm.moe.ffn_hidden_size", f"{ffn}", "the input of each expert's linear_fc2",
                       ffn, max(1, config.parallel.expert_tensor)))
        if moe.shared_expert_ffn_hidden_size is not None:
            widths.append(("model.lm.moe.shared_expert_ffn_hidden_size", f"{moe.shared_expert_ffn_hidden_size}",
                           "the input of the shared expert's linear_fc2", moe.shared_expert_ffn_hidden_size, tp))
    return widths


def _check_fp8(c: _Checks, config: Config) -> None:
    """train.fp8: FP8 GEMMs need bf16, Transformer Engine layers and GEMM widths TE can quantize."""
    # Imported here: the platform package builds on the config, not the other way round.
    from megavl.platform.features import te_layers_refusal

    t = config.train
    if t.fp8 is None:
        c.require(not t.fp8_vision, "train.fp8_vision = true: needs train.fp8 (e4m3 or hybrid); the vision "
                                    "tower runs in FP8 only alongside the LM")
        return
    name = f"train.fp8 = {t.fp8}"
    c.require(t.dtype == "bf16", f"{name}: needs train.dtype = bf16 (got {t.dtype}); the FP8 GEMMs run "
                                 "beside bf16 weights and activations, FP8 with fp32 parameters is not supported")
    if config.model.layer_backend == "local":
        c.require(False, f"{name}: needs Transformer Engine layers, and model.layer_backend = local builds "
                         "megatron-core's local linears, which have no FP8 path; use auto or te")
    refusal = te_layers_refusal(config)
    c.require(refusal is None, f"{name}: needs Transformer Engine layers, but {refusal} (vision LoRA on "
                               "Transformer Engine layers is not implemented yet); set model.lm.vision_lora."
                               "mlp_rank = attn_rank = 0, or leave train.fp8 unset")
    c.at_least("train.fp8_amax_history_len", t.fp8_amax_history_len, 1)
    c.at_least("train.fp8_margin", t.fp8_margin, 0)

    multiple = _fp8_gemm_multiple(t.fp8_recipe)
    need = f"not a multiple of {multiple} as Transformer Engine's FP8 GEMMs need (train.fp8_recipe = {t.fp8_recipe})"
    towers = [("lm", name, None)]
    if t.fp8_vision:
        towers.append(("vision", "train.fp8_vision = true", "keep the tower in bf16 (train.fp8_vision = false)"))
    for tower, setting_name, remedy in towers:
        reported = set()
        for field, setting, what, width, split, *fix in _fp8_gemm_widths(config, tower):
            # A width that does not split evenly is reported by the layout checks.
            if field in reported or width < 1 or width % split:
                continue
            fix = remedy or (fix[0].format(multiple=multiple) if fix else f"make it a multiple of {multiple * split}")
            if not c.require(
                (width // split) % multiple == 0,
                f"{setting_name}: {field} = {setting} makes {what} {width // split} wide"
                + (f" per tensor-parallel rank ({width} / {split})" if split > 1 else "")
                + f", {need}; {fix}",
            ):
                reported.add(field)
    # Every packed row is train.seq_length tokens; with sequence parallelism each TP rank's linears
    # take their share of them. (The vision tower pads its patches, the experts their tokens.)
    p = config.parallel
    split = p.tensor if p.sequence_parallel and p.tensor > 1 else 1
    tokens = t.seq_length * t.micro_batch_size
    if tokens >= 1 and tokens % split == 0:
        c.require(
            (tokens // split) % multiple == 0,
            f"{name}: train.seq_length * train.micro_batch_size = {t.seq_length}*{t.micro_batch_size} gives the "
            f"LM's GEMMs {tokens // split} tokens"
            + (f" per tensor-parallel rank ({tokens} / {split})" if split > 1 else "")
            + f", {need}; make train.seq_length a multiple of {multiple * split}",
        )


def _check_perf(c: _Checks, config: Config) -> None:
    # Imported here: the platform package builds on the config, not the other way round.
    from megavl.platform.perf import perf_problems

    for problem in perf_problems(config):
        c.require(False, problem)


def validate(config: Config, world_size: int) -> None:
    """Check that config can run on world_size processes.

    Raises ConfigError listing every problem, each naming the field, its
    value and what would be valid.
    """
    c = _Checks()
    _check_choices(c, config, "")
    _check_vision(c, config)
    _check_adapter(c, config)
    _check_lm(c, config)
    _check_layer_backend(c, config)
    _check_moe(c, config)
    _check_vision_lora(c, config)
    dp = _check_parallel(c, config, world_size)
    _check_train(c, config, dp)
    _check_fp8(c, config)
    _check_data(c, config)
    _check_parts(c, config)
    _check_embedding_rows(c, config)
    _check_perf(c, config)
    c.at_least("checkpoint.interval", config.checkpoint.interval, 0)
    c.at_least("checkpoint.keep_last", config.checkpoint.keep_last, 0)
    c.at_least("checkpoint.keep_every", config.checkpoint.keep_every, 0)
    c.at_least("train.max_nonfinite_steps", config.train.max_nonfinite_steps, 1)
    if config.train.max_wall_time is not None:
        c.positive("train.max_wall_time", config.train.max_wall_time)
    c.at_least("logging.interval", config.logging.interval, 1)
    if config.logging.peak_tflops is not None:
        c.positive("logging.peak_tflops", config.logging.peak_tflops)
    if c.problems:
        raise report_problems(c.problems, f"invalid configuration for world size {world_size}")
