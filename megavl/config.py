"""Typed run configuration for megavl.

Configs are plain dataclasses built from YAML plus ``key.path=value``
overrides. Everything is checked here, before any process group exists, so a
bad setting fails in seconds on one process with a message that names the
field, instead of as a shape error deep inside a parallel run.
"""

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be loaded or would not run."""


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

ROPE_KINDS = ("1d", "mrope")
MOE_DISPATCHERS = ("alltoall", "allgather")
IMAGE_ATTENTION_KINDS = ("bidirectional", "causal")
DTYPES = ("fp32", "bf16")
# Vision-tower variants: Qwen2.5-VL uses RMSNorm + SwiGLU, Qwen2-VL LayerNorm + QuickGELU.
VISION_NORMS = ("rmsnorm", "layernorm")
VISION_MLPS = ("swiglu", "gelu_quick")
# How an image becomes vision tokens (see megavl/data/resolution.py).
RESOLUTION_MODES = ("native", "fixed", "tiling")
FIXED_FITS = ("pad", "resize")
IMAGE_BACKENDS = ("auto", "dali", "pillow")


@dataclass
class VisionConfig:
    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 128
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    # Pixels per window side; a window holds window_size // patch_size
    # patches per side.
    window_size: int = 112
    # 0-based layers that attend over the whole image; the rest use windows.
    full_attention_layers: list[int] = field(default_factory=lambda: [3])
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Norm of the encoder layers and of the adapter's pre-merge norm
    # (layernorm has a bias).
    norm: str = "rmsnorm"
    # swiglu: gated fc1 = [gate; up] with SiLU; gelu_quick: fc1 -> x*sigmoid(1.702x) -> fc2.
    mlp: str = "swiglu"


@dataclass
class AdapterConfig:
    # None means vision.hidden_size * spatial_merge_size**2, i.e. the width
    # of the merged patch vector the adapter consumes.
    ffn_hidden_size: Optional[int] = None


@dataclass
class MoEConfig:
    # 0 keeps the LM dense; otherwise the MLPs of every layer not in dense_layers
    # become mixture-of-experts layers with a router shared by text and vision tokens.
    num_experts: int = 0
    top_k: int = 2
    # Per-expert FFN width; None uses model.lm.ffn_hidden_size.
    ffn_hidden_size: Optional[int] = None
    # Width of an always-on shared expert; None for none.
    shared_expert_ffn_hidden_size: Optional[int] = None
    # 0-based LM layers that keep a dense MLP (e.g. [0] for a dense first layer).
    dense_layers: list[int] = field(default_factory=list)
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 1e-3
    dispatcher: str = "alltoall"
    # True: the top-k probabilities are renormalised to sum to one (softmax over
    # the chosen logits); False: each chosen expert keeps its softmax probability
    # over all experts (megatron's moe_router_pre_softmax; Qwen3 norm_topk_prob=false).
    normalize_top_k: bool = True


@dataclass
class VisionLoRAConfig:
    # Low-rank adapters that only vision tokens use, on every (expert) MLP and on
    # the attention's QKV and output projections. A rank of 0 removes them.
    mlp_rank: int = 32
    attn_rank: int = 8
    # The update is (alpha / rank) * B @ A.
    alpha: float = 32.0
    # Their own weight decay, pulling the vision path back toward the text path.
    weight_decay: float = 0.1
    # False keeps the adapters in the model (and checkpoints) but unused and
    # frozen, e.g. for the alignment stage.
    enabled: bool = True


@dataclass
class LMConfig:
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 344
    vocab_size: int = 2048
    qkv_bias: bool = True
    qk_layernorm: bool = False
    rope: str = "mrope"
    # Rotary frequency pairs given to the temporal, height and width axes.
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    rope_theta: float = 1000000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    image_attention: str = "bidirectional"
    image_token_id: int = 3
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision_lora: VisionLoRAConfig = field(default_factory=VisionLoRAConfig)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    lm: LMConfig = field(default_factory=LMConfig)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    # Tensor parallelism inside each expert (megatron's expert_tensor_parallel_size).
    expert_tensor: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # LM layers on the first pipeline stage. That stage also runs the vision
    # encoder, so giving it fewer LM layers balances the stages. None splits
    # the LM evenly.
    first_stage_lm_layers: Optional[int] = None
    distributed_optimizer: bool = True


@dataclass
class ResolutionConfig:
    """How images are sized; the default for every dataset, and per dataset
    overridable from a metadataset's ``subflavors: {resolution: {...}}``."""

    # native: keep the aspect ratio, sides multiples of patch*merge, area in
    #   [min_pixels, max_pixels] (Qwen2-VL's rule).
    # fixed: one square regime of fixed_tokens merged tokens (256 -> 448x448 px
    #   at patch 14 / merge 2), reached by padding (aspect kept) or resizing.
    # tiling: a grid of tile_size tiles fitting the aspect ratio, up to
    #   max_tiles, plus an optional global thumbnail (documents).
    mode: str = "native"
    min_pixels: int = 3136
    max_pixels: int = 200704
    fixed_tokens: int = 256
    fixed_fit: str = "pad"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 9
    thumbnail: bool = True
    # Text such as "<tile_1_2>" / "<tile_global>" before each tile's image tokens.
    tile_tags: bool = False


@dataclass
class MaxPixelScheduleConfig:
    """Progressive cap on native-resolution max_pixels: a step function that
    rises geometrically from start_max_pixels to data.resolution.max_pixels in
    `stages` equal steps over the first `fraction` of training."""

    start_max_pixels: int = 0  # 0: no schedule, the cap is max_pixels throughout
    fraction: float = 0.35
    stages: int = 4


@dataclass
class DataConfig:
    # A prepared dataset directory (energon .nv-meta) or a metadataset YAML
    # blending several of them.
    train_path: Optional[str] = None
    val_path: Optional[str] = None
    tokenizer: Optional[str] = None
    # Dataloader worker processes per rank (decode runs in them); 0 decodes in
    # the training process.
    num_workers: int = 0
    image_backend: str = "auto"
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    max_pixels_schedule: MaxPixelScheduleConfig = field(default_factory=MaxPixelScheduleConfig)
    # Images larger than this are refused before decoding (decompression bombs).
    max_image_pixels: int = 64_000_000
    conversation_mask_prob: float = 0.5
    grounding_conversation_mask_prob: float = 0.7
    max_images_per_pack: int = 8
    # Vision-token budget per pack; 0: only the token budget (train.seq_length) applies.
    max_vision_tokens_per_pack: int = 0
    # Records the packer chooses from at a time (first-fit decreasing). They hold
    # only encoded bytes until packed: a larger buffer packs tighter for little memory.
    packing_buffer_size: int = 512
    shuffle_buffer_size: int = 100
    # Energon reads shards in random slices of at most this many samples.
    max_samples_per_sequence: int = 100
    # Even out vision tokens across data-parallel ranks within each step.
    balance_vision_tokens: bool = True
    # Stop the run when a dataset's share of failed samples exceeds this after
    # at least failure_check_min_samples of its samples were read.
    max_failure_rate: float = 0.05
    failure_check_min_samples: int = 200
    # True: every data-parallel rank reads the global stream and takes its share of
    # microbatches, so results do not depend on the DP size (each rank decodes all
    # samples). False: records are split across DP ranks (each decodes only its own).
    layout_invariant: bool = True


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 4
    seq_length: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    dtype: str = "fp32"
    dropout: float = 0.0
    # Std of the normal initialisation (residual outputs are scaled by 1/sqrt(2 * layers)).
    init_std: float = 0.02
    eval_interval: int = 50
    eval_steps: int = 2


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    # Weights to start from (e.g. tools/convert_from_hf.py output) when not resuming;
    # vision adapters missing from it start fresh (B = 0, so the model is unchanged).
    pretrained: Optional[str] = None
    # 0 saves only at the end of training.
    interval: int = 0
    load: Optional[str] = None


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    interval: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------
# Type-checked construction from plain data
# ---------------------------------------------------------------------------


def _report(problems: Sequence[str], what: str) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"{what}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    return ConfigError(f"{what} ({len(problems)} problems):\n{lines}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _section_name(prefix: str) -> str:
    return prefix if prefix else "the top level"


def _optional_inner(tp: Any) -> Optional[Any]:
    """The X of Optional[X], or None when tp is not optional."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _describe(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_describe(inner)} or null"
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        return f"a list of {_describe(elem)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return tp.__name__


class _TypeMismatch(Exception):
    pass


def _convert_scalar(value: Any, tp: type) -> Any:
    # bool is a subclass of int, but `true` for a layer count is a typo,
    # never intent, so it is refused for numeric fields.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r}")
    raise _TypeMismatch


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    target = tp
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        target = inner
    try:
        if typing.get_origin(target) is list:
            if not isinstance(value, (list, tuple)):
                raise _TypeMismatch
            (elem,) = typing.get_args(target)
            return [_convert_scalar(v, elem) for v in value]
        return _convert_scalar(value, target)
    except _TypeMismatch:
        problems.append(f"{path} = {value!r}: expected {_describe(tp)}")
        return None


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, recording problems instead of
    stopping at the first so one run of the loader reports them all."""
    if data is None:
        # An empty YAML section (`train:` with nothing under it).
        data = {}
    if not isinstance(data, dict):
        problems.append(
            f"{_section_name(prefix)} = {data!r}: expected a mapping of "
            f"{', '.join(_field_types(cls))}"
        )
        return cls()
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        path = _join(prefix, str(key))
        if key not in types:
            problems.append(
                f"unknown key {path!r} (value {value!r}); valid keys in "
                f"{_section_name(prefix)}: {', '.join(types)}"
            )
            continue
        converted = _convert(value, types[key], path, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**kwargs)


def config_from_dict(d: Optional[dict]) -> Config:
    """Build a Config from nested plain data (as read from YAML)."""
    problems: list[str] = []
    config = _build(Config, d, "", problems)
    if problems:
        raise _report(problems, "invalid configuration")
    return config


def config_to_dict(c: Config) -> dict:
    """Nested plain data that yaml.safe_dump accepts and config_from_dict
    turns back into an equal Config."""
    return dataclasses.asdict(c)


def dump_config(c: Config) -> str:
    return yaml.safe_dump(config_to_dict(c), sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------
# Loading and overrides
# ---------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: key {key!r} has an empty component")
    try:
        # YAML parsing lets `4`, `true`, `[1, 2]` and `null` mean what they
        # would in the config file.
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value {raw!r} is not valid YAML: {e}") from e
    return parts, value


def _apply_override(data: dict, text: str) -> None:
    parts, value = _parse_override(text)
    cls: Any = Config
    node = data
    prefix = ""
    for i, part in enumerate(parts):
        types = _field_types(cls)
        path = _join(prefix, part)
        if part not in types:
            raise ConfigError(
                f"override {text!r}: unknown key {path!r}; valid keys in "
                f"{_section_name(prefix)}: {', '.join(types)}"
            )
        if i == len(parts) - 1:
            node[part] = value
            return
        cls = types[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(
                f"override {text!r}: {path} is a field of type {_describe(cls)}, "
                f"not a section, so it has no key {parts[i + 1]!r}"
            )
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {text!r}: {path} = {child!r} in the config file is "
                "not a mapping"
            )
        node = child
        prefix = path


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path!r}: {e}") from e
    except yaml.YAMLError as e:
        # Includes tags such as !!python/object, which safe_load refuses.
        raise ConfigError(f"config file {path!r} is not valid safe YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r}: top level is {type(data).__name__}, expected "
            f"a mapping with keys {', '.join(_field_types(Config))}"
        )
    return data


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None or an empty file gives the defaults), apply
    `key.path=value` overrides in order and build a typed Config.

    The result is type-checked but not cross-checked; call validate() once
    the world size is known.
    """
    data = _read_yaml(path) if path is not None else {}
    if isinstance(overrides, str):
        # A lone string would otherwise be applied one character at a time.
        overrides = [overrides]
    for text in overrides:
        _apply_override(data, text)
    return config_from_dict(data)


# ---------------------------------------------------------------------------
# Cross-field validation
# ---------------------------------------------------------------------------


def _model_parallel_size(config: Config) -> int:
    p = config.parallel
    return p.tensor * p.pipeline * p.context


def data_parallel_size(config: Config, world_size: int) -> int:
    """Number of data-parallel replicas for this config at world_size."""
    mp = _model_parallel_size(config)
    if mp < 1 or world_size < 1 or world_size % mp:
        raise ConfigError(
            f"world size {world_size} is not a positive multiple of "
            f"parallel.tensor * parallel.pipeline * parallel.context = {mp}"
        )
    return world_size // mp


def lm_layers_per_stage(config: Config) -> list[int]:
    """LM layer count on each pipeline stage, first stage first."""
    n = config.model.lm.num_layers
    pp = config.parallel.pipeline
    first = config.parallel.first_stage_lm_layers
    if pp < 1 or pp > n:
        raise ConfigError(
            f"parallel.pipeline = {pp}: must be between 1 and model.lm.num_layers ({n})"
        )
    if pp == 1:
        return [n]
    if first is None:
        if n % pp:
            raise ConfigError(
                f"model.lm.num_layers = {n} is not divisible by parallel.pipeline = {pp}; "
                "set parallel.first_stage_lm_layers for an uneven split"
            )
        return [n // pp] * pp
    rest = n - first
    if first < 1 or rest < pp - 1 or rest % (pp - 1):
        raise ConfigError(
            f"parallel.first_stage_lm_layers = {first}: the other {pp - 1} stages "
            f"must share the remaining {rest} of {n} LM layers evenly, with at least one each"
        )
    return [first] + [rest // (pp - 1)] * (pp - 1)


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

    def one_of(self, name: str, value: Any, allowed: Sequence[str]) -> bool:
        return self.require(
            value in allowed, f"{name} = {value!r}: must be one of {', '.join(allowed)}"
        )

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


def _head_dim_checks(c: _Checks, section: str, hidden: int, heads: int, tp: int) -> Optional[int]:
    """Checks shared by both transformers; returns head_dim when it is sound."""
    ok = c.at_least(f"{section}.hidden_size", hidden, 1)
    ok = c.at_least(f"{section}.num_attention_heads", heads, 1) and ok
    if not ok:
        return None
    c.divisible(f"{section}.num_attention_heads", heads, "parallel.tensor", tp)
    if not c.divisible(f"{section}.hidden_size", hidden, f"{section}.num_attention_heads", heads):
        return None
    head_dim = hidden // heads
    # Rotary embeddings rotate pairs of channels.
    if not c.require(
        head_dim % 2 == 0,
        f"{section}.hidden_size / {section}.num_attention_heads = {hidden}/{heads} "
        f"= head dim {head_dim}: must be even for rotary embeddings",
    ):
        return None
    return head_dim


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
    if patch_ok and merge_ok:
        # Windows must hold whole merged tokens, or merging would straddle
        # window boundaries.
        unit = v.patch_size * v.spatial_merge_size
        c.require(
            v.window_size > 0 and v.window_size % unit == 0,
            f"{s}.window_size = {v.window_size}: must be a positive multiple of "
            f"{s}.patch_size * {s}.spatial_merge_size = {unit}",
        )
    bad = [i for i in v.full_attention_layers if not 0 <= i < v.num_layers]
    c.require(
        not bad,
        f"{s}.full_attention_layers = {v.full_attention_layers}: indices {bad} are "
        f"outside [0, {v.num_layers}) (0-based, {s}.num_layers = {v.num_layers})",
    )
    c.positive(f"{s}.norm_eps", v.norm_eps)
    c.positive(f"{s}.rope_theta", v.rope_theta)
    c.one_of(f"{s}.norm", v.norm, VISION_NORMS)
    c.one_of(f"{s}.mlp", v.mlp, VISION_MLPS)


def _check_adapter(c: _Checks, config: Config) -> None:
    a = config.model.adapter
    if a.ffn_hidden_size is None:
        return
    name = "model.adapter.ffn_hidden_size"
    if c.at_least(name, a.ffn_hidden_size, 1):
        c.divisible(name, a.ffn_hidden_size, "parallel.tensor", config.parallel.tensor)


def _check_lm(c: _Checks, config: Config) -> None:
    m = config.model.lm
    tp = config.parallel.tensor
    s = "model.lm"
    c.at_least(f"{s}.num_layers", m.num_layers, 1)
    head_dim = _head_dim_checks(c, s, m.hidden_size, m.num_attention_heads, tp)
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
    if c.one_of(f"{s}.rope", m.rope, ROPE_KINDS) and m.rope == "mrope":
        c.require(
            len(m.mrope_section) == 3 and all(x >= 0 for x in m.mrope_section),
            f"{s}.mrope_section = {m.mrope_section}: must be 3 non-negative "
            "entries (temporal, height, width)",
        )
        if head_dim is not None:
            c.require(
                sum(m.mrope_section) == head_dim // 2,
                f"{s}.mrope_section = {m.mrope_section}: sums to {sum(m.mrope_section)}, "
                f"must sum to head_dim // 2 = {head_dim // 2} "
                f"({s}.hidden_size {m.hidden_size} / num_attention_heads "
                f"{m.num_attention_heads} = {head_dim})",
            )
    c.positive(f"{s}.rope_theta", m.rope_theta)
    c.positive(f"{s}.norm_eps", m.norm_eps)
    c.at_least(f"{s}.max_position_embeddings", m.max_position_embeddings, 1)
    c.one_of(f"{s}.image_attention", m.image_attention, IMAGE_ATTENTION_KINDS)
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
    c.one_of(f"{s}.dispatcher", m.dispatcher, MOE_DISPATCHERS)


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
    p = config.parallel
    n = config.model.lm.num_layers
    pp = p.pipeline
    first = p.first_stage_lm_layers
    if pp < 1 or n < 1:
        return
    if not c.require(
        pp <= n,
        f"parallel.pipeline = {pp}: must be <= model.lm.num_layers ({n}) so "
        "every stage holds at least one LM layer",
    ):
        return
    if pp == 1:
        c.require(
            first is None or first == n,
            f"parallel.first_stage_lm_layers = {first}: only meaningful with "
            f"parallel.pipeline > 1; use null (or {n}) with a single stage",
        )
        return
    if first is None:
        c.require(
            n % pp == 0,
            f"model.lm.num_layers = {n}: must be divisible by parallel.pipeline "
            f"({pp}) for an even split, or set parallel.first_stage_lm_layers",
        )
        return
    rest_stages = pp - 1
    upper = n - rest_stages
    if not c.require(
        1 <= first <= upper,
        f"parallel.first_stage_lm_layers = {first}: must be between 1 and "
        f"model.lm.num_layers - (parallel.pipeline - 1) = {upper}",
    ):
        return
    c.require(
        (n - first) % rest_stages == 0,
        f"parallel.first_stage_lm_layers = {first}: the remaining {n - first} LM "
        f"layers must be divisible by the other {rest_stages} pipeline stages; "
        f"valid values: {[f for f in range(1, upper + 1) if (n - f) % rest_stages == 0]}",
    )


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
    mp = _model_parallel_size(config)
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
    if c.at_least("train.warmup_steps", t.warmup_steps, 0):
        c.require(
            t.warmup_steps <= t.steps,
            f"train.warmup_steps = {t.warmup_steps}: must be <= train.steps ({t.steps})",
        )
    c.at_least("train.weight_decay", t.weight_decay, 0)
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        c.require(0.0 <= value < 1.0, f"train.{name} = {value}: must be in [0, 1)")
    c.positive("train.adam_eps", t.adam_eps)
    c.at_least("train.clip_grad", t.clip_grad, 0)
    c.one_of("train.dtype", t.dtype, DTYPES)
    c.require(0.0 <= t.dropout < 1.0, f"train.dropout = {t.dropout}: must be in [0, 1)")
    c.require(t.init_std > 0.0, f"train.init_std = {t.init_std}: must be > 0")
    c.at_least("train.eval_interval", t.eval_interval, 1)
    c.at_least("train.eval_steps", t.eval_steps, 1)


def check_resolution(c: "_Checks", r: ResolutionConfig, config: Config, prefix: str = "data.resolution") -> None:
    """Also used for a dataset's override, with the dataset named in prefix."""
    v = config.model.vision
    unit = v.patch_size * v.spatial_merge_size
    c.one_of(f"{prefix}.mode", r.mode, RESOLUTION_MODES)
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
        side = round(r.fixed_tokens ** 0.5)
        c.require(
            side * side == r.fixed_tokens,
            f"{prefix}.fixed_tokens = {r.fixed_tokens}: must be a square number "
            f"(e.g. 64, 100, 256, 400) so the regime is a square of merged tokens",
        )
    c.one_of(f"{prefix}.fixed_fit", r.fixed_fit, FIXED_FITS)
    if c.positive(f"{prefix}.tile_size", r.tile_size):
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
        return [f"{prefix} = {override!r}: expected a mapping of {', '.join(_field_types(ResolutionConfig))}"]
    problems: list[str] = []
    merged = {**dataclasses.asdict(config.data.resolution), **override}
    resolution = _build(ResolutionConfig, merged, prefix, problems)
    if not problems:
        c = _Checks()
        check_resolution(c, resolution, config, prefix)
        problems += c.problems
    return problems


def _check_data(c: _Checks, config: Config) -> None:
    d = config.data
    c.at_least("data.num_workers", d.num_workers, 0)
    c.one_of("data.image_backend", d.image_backend, IMAGE_BACKENDS)
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


def validate(config: Config, world_size: int) -> None:
    """Check that config can run on world_size processes.

    Raises ConfigError listing every problem, each naming the field, its
    value and what would be valid.
    """
    c = _Checks()
    _check_vision(c, config)
    _check_adapter(c, config)
    _check_lm(c, config)
    _check_moe(c, config)
    _check_vision_lora(c, config)
    dp = _check_parallel(c, config, world_size)
    _check_train(c, config, dp)
    _check_data(c, config)
    c.at_least("checkpoint.interval", config.checkpoint.interval, 0)
    c.at_least("logging.interval", config.logging.interval, 1)
    if c.problems:
        raise _report(c.problems, f"invalid configuration for world size {world_size}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --config FILE and --set KEY=VALUE ... to parser."""
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="*",
        action="extend",
        default=None,
        help="override a config field, e.g. --set train.lr=3e-4 parallel.tensor=2; "
        "values are parsed as YAML; may be repeated",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the Config named by add_config_args' options."""
    path = getattr(args, "config", None)
    if path is not None:
        path = os.fspath(path)
    return load_config(path, getattr(args, "overrides", None) or ())
