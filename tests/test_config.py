import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from megavl.config import (
    Config,
    ConfigError,
    add_config_args,
    config_from_args,
    config_from_dict,
    config_to_dict,
    data_parallel_size,
    dump_config,
    lm_layers_per_stage,
    load_config,
    validate,
)

TINY = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_cpu.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------
# Defaults and the example config
# ---------------------------------------------------------------------------


def test_defaults_validate_at_world_size_1():
    config = Config()
    validate(config, 1)
    assert data_parallel_size(config, 1) == 1
    assert lm_layers_per_stage(config) == [4]


def test_load_none_and_empty_file_give_defaults(tmp_path):
    assert load_config(None) == Config()
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()


def test_empty_section_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "train:\nmodel:\n  lm:\n")) == Config()


def test_sub_configs_do_not_share_mutable_defaults():
    a, b = Config(), Config()
    a.model.vision.full_attention_layers.append(0)
    assert b.model.vision.full_attention_layers == [3]


@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_cpu_config_validates(world_size):
    config = load_config(str(TINY))
    validate(config, world_size)
    assert data_parallel_size(config, world_size) == world_size
    assert config.model.vision.window_size == 56
    assert config.model.lm.mrope_section == [4, 6, 6]
    assert config.train.lr == pytest.approx(2e-3)
    assert config.train.micro_batch_size == 2
    assert config.train.global_batch_size == 4
    assert config.data.train_path == "data/synthetic/train"
    assert config.checkpoint.dir == "runs/tiny_cpu/checkpoints"
    assert config.checkpoint.interval == 100
    assert config.logging.dir == "runs/tiny_cpu"


# ---------------------------------------------------------------------------
# Overrides and type handling
# ---------------------------------------------------------------------------


def test_overrides_of_every_kind():
    config = load_config(
        None,
        [
            "train.steps=7",
            "train.lr=0.5",
            "model.lm.qkv_bias=false",
            "model.vision.full_attention_layers=[1, 3]",
            "parallel.first_stage_lm_layers=null",
            "data.tokenizer=some/dir",
            "train.dtype=bf16",
            "model.adapter.ffn_hidden_size=96",
        ],
    )
    assert config.train.steps == 7
    assert config.train.lr == 0.5
    assert config.model.lm.qkv_bias is False
    assert config.model.vision.full_attention_layers == [1, 3]
    assert config.parallel.first_stage_lm_layers is None
    assert config.data.tokenizer == "some/dir"
    assert config.train.dtype == "bf16"
    assert config.model.adapter.ffn_hidden_size == 96


def test_override_replaces_file_value_and_later_override_wins(tmp_path):
    path = write(tmp_path, "train:\n  steps: 5\nparallel:\n  first_stage_lm_layers: 2\n")
    config = load_config(path, ["train.steps=9", "train.steps=11", "parallel.first_stage_lm_layers=null"])
    assert config.train.steps == 11
    assert config.parallel.first_stage_lm_layers is None


def test_override_whole_section_with_mapping():
    config = load_config(None, ["logging={dir: out, interval: 5}"])
    assert config.logging.dir == "out"
    assert config.logging.interval == 5


def test_exponent_without_dot_is_a_float(tmp_path):
    config = load_config(write(tmp_path, "train:\n  min_lr: 1e-5\n"), ["train.lr=1e-3"])
    assert config.train.lr == 1e-3
    assert isinstance(config.train.lr, float)
    assert config.train.min_lr == 1e-5


def test_int_accepted_for_float_field():
    config = load_config(None, ["train.clip_grad=2"])
    assert config.train.clip_grad == 2.0
    assert isinstance(config.train.clip_grad, float)


def test_unsafe_yaml_tag_is_rejected(tmp_path):
    path = write(tmp_path, "train: !!python/object:argparse.Namespace {steps: 3}\n")
    with pytest.raises(ConfigError, match="safe YAML"):
        load_config(path)


def test_unsafe_yaml_tag_in_override_is_rejected():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=!!python/object/apply:os.getcwd []"])


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["train.steps"], ["train.steps", "KEY=VALUE"]),
        (["=4"], ["=4", "KEY=VALUE"]),
        (["train.steps.count=3"], ["train.steps", "not a section"]),
        (["trian.steps=3"], ["trian", "model, parallel, perf, data, train, checkpoint, logging"]),
        (["model.lm.hiden_size=3"], ["model.lm.hiden_size", "hidden_size", "num_query_groups"]),
        (["train.lr=[1,"], ["train.lr", "[1,"]),
    ],
)
def test_bad_overrides(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.dtype=16", ["train.dtype", "16", "str"]),
        ("train.steps=abc", ["train.steps", "abc", "int"]),
        ("train.steps=true", ["train.steps", "True", "int"]),
        ("train.steps=2.5", ["train.steps", "2.5", "int"]),
        ("train.lr=fast", ["train.lr", "fast", "float"]),
        ("train.lr=true", ["train.lr", "True", "float"]),
        ("model.lm.qkv_bias=1", ["model.lm.qkv_bias", "1", "bool"]),
        ("logging.dir=null", ["logging.dir", "None", "str"]),
        ("model.lm.mrope_section=[4, x, 6]", ["model.lm.mrope_section", "'x'", "list of int"]),
        ("model.lm.mrope_section=[4, true, 6]", ["model.lm.mrope_section", "True", "list of int"]),
        ("model.lm.mrope_section=16", ["model.lm.mrope_section", "16", "list of int"]),
        ("parallel.first_stage_lm_layers=two", ["parallel.first_stage_lm_layers", "two", "int or null"]),
        ("model.lm=3", ["model.lm", "3", "mapping"]),
    ],
)
def test_wrong_types(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    path = write(tmp_path, "model:\n  vision:\n    layers: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "model.vision.layers" in message
    assert "2" in message
    for key in ("num_layers", "patch_size", "window_size", "full_attention_layers"):
        assert key in message


def test_all_load_problems_reported_together(tmp_path):
    path = write(tmp_path, "train:\n  steps: many\n  lr: true\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "3 problems" in message
    for fragment in ("train.steps", "train.lr", "bogus"):
        assert fragment in message


# ---------------------------------------------------------------------------
# Cross-field validation
# ---------------------------------------------------------------------------


def problems_for(overrides, world_size=1) -> str:
    config = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        validate(config, world_size)
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, world_size, fragments",
    [
        pytest.param(
            ["model.lm.num_query_groups=3"], 1,
            ["model.lm.num_attention_heads = 4", "divisible by model.lm.num_query_groups (3)"],
            id="heads-not-divisible-by-groups",
        ),
        pytest.param(
            ["parallel.tensor=8"], 8, ["model.lm.num_attention_heads = 4", "parallel.tensor (8)"],
            id="heads-not-divisible-by-tp",
        ),
        pytest.param(
            ["parallel.tensor=4"], 4, ["model.lm.num_query_groups = 2", "parallel.tensor (4)"],
            id="kv-groups-not-divisible-by-tp",
        ),
        pytest.param(
            ["parallel.pipeline=5"], 5, ["parallel.pipeline = 5", "model.lm.num_layers (4)"],
            id="pp-greater-than-layers",
        ),
        pytest.param(
            ["parallel.pipeline=2", "parallel.first_stage_lm_layers=4"], 2,
            ["parallel.first_stage_lm_layers = 4", "between 1 and", "= 3"],
            id="first-stage-too-many",
        ),
        pytest.param(
            ["parallel.pipeline=2", "parallel.first_stage_lm_layers=0"], 2,
            ["parallel.first_stage_lm_layers = 0", "between 1 and"],
            id="first-stage-zero",
        ),
        pytest.param(
            ["parallel.pipeline=3", "model.lm.num_layers=6", "parallel.first_stage_lm_layers=3"], 3,
            ["parallel.first_stage_lm_layers = 3", "remaining 3", "valid values: [2, 4]"],
            id="first-stage-remainder-uneven",
        ),
        pytest.param(
            ["parallel.first_stage_lm_layers=2"], 1,
            ["parallel.first_stage_lm_layers = 2", "parallel.pipeline > 1"],
            id="first-stage-without-pp",
        ),
        pytest.param(
            ["parallel.pipeline=3", "model.lm.num_layers=4"], 3,
            ["model.lm.num_layers = 4", "parallel.pipeline (3)"],
            id="uneven-pp-split",
        ),
        pytest.param(
            ["parallel.tensor=2"], 3, ["world size 3", "= 2"],
            id="world-size-not-divisible",
        ),
        pytest.param(
            ["parallel.expert=2"], 1, ["parallel.expert = 2", "mixture-of-experts", "model.lm"],
            id="expert-parallel",
        ),
        pytest.param(
            ["parallel.context=2"], 2, ["parallel.context = 2", "not supported"],
            id="context-parallel",
        ),
        pytest.param(
            ["parallel.tensor=0"], 1, ["parallel.tensor = 0", ">= 1"],
            id="zero-tp",
        ),
        pytest.param(
            ["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
            ["train.global_batch_size = 6", "2*2 = 4"],
            id="global-batch-not-divisible",
        ),
        pytest.param(
            ["parallel.sequence_parallel=true"], 1,
            ["parallel.sequence_parallel = True", "parallel.tensor > 1"],
            id="sequence-parallel-without-tp",
        ),
        pytest.param(
            ["parallel.sequence_parallel=true", "parallel.tensor=2", "train.seq_length=511"], 2,
            ["train.seq_length = 511", "parallel.tensor (2)"],
            id="sequence-parallel-seq-length",
        ),
        pytest.param(
            ["model.lm.mrope_section=[4, 6, 8]"], 1,
            ["model.lm.mrope_section = [4, 6, 8]", "sums to 18", "16"],
            id="mrope-section-mismatch",
        ),
        pytest.param(
            ["model.lm.mrope_section=[8, 8]"], 1,
            ["model.lm.mrope_section = [8, 8]", "3 non-negative"],
            id="mrope-section-length",
        ),
        pytest.param(
            ["model.lm.rope=2d"], 1, ["model.lm.rope = '2d'", "1d, mrope"],
            id="bad-rope",
        ),
        pytest.param(
            ["model.lm.image_attention=full"], 1,
            ["model.lm.image_attention = 'full'", "bidirectional, causal"],
            id="bad-image-attention",
        ),
        pytest.param(
            ["train.dtype=fp16"], 1, ["train.dtype = 'fp16'", "fp32, bf16"],
            id="bad-dtype",
        ),
        pytest.param(
            ["model.lm.hidden_size=130"], 1,
            ["model.lm.hidden_size = 130", "model.lm.num_attention_heads (4)"],
            id="lm-hidden-not-divisible",
        ),
        pytest.param(
            ["model.vision.hidden_size=68"], 1, ["model.vision.hidden_size", "68/4", "head dim 17", "even"],
            id="vision-odd-head-dim",
        ),
        pytest.param(
            ["parallel.tensor=8", "model.lm.num_attention_heads=8", "model.lm.num_query_groups=8",
             "model.lm.hidden_size=256", "model.lm.mrope_section=[4, 6, 6]", "model.lm.ffn_hidden_size=512"],
            8, ["model.vision.num_attention_heads = 4", "parallel.tensor (8)"],
            id="vision-heads-not-divisible-by-tp",
        ),
        pytest.param(
            ["model.vision.full_attention_layers=[0, 4]"], 1,
            ["model.vision.full_attention_layers = [0, 4]", "[4]", "[0, 4)"],
            id="full-attention-layer-out-of-range",
        ),
        pytest.param(
            ["model.vision.window_size=60"], 1, ["model.vision.window_size = 60", "multiple", "28"],
            id="window-not-multiple",
        ),
        pytest.param(["train.steps=0"], 1, ["train.steps = 0", "> 0"], id="zero-steps"),
        pytest.param(
            ["train.lr=1e-6", "train.min_lr=1e-5"], 1, ["train.lr = 1e-06", "train.min_lr"],
            id="lr-below-min-lr",
        ),
        pytest.param(["train.min_lr=-1"], 1, ["train.min_lr = -1", ">= 0"], id="negative-min-lr"),
        pytest.param(
            ["train.warmup_steps=200"], 1, ["train.warmup_steps = 200", "train.steps (100)"],
            id="warmup-too-long",
        ),
        pytest.param(
            ["data.conversation_mask_prob=1.5"], 1, ["data.conversation_mask_prob = 1.5", "[0, 1]"],
            id="probability-range",
        ),
        pytest.param(
            ["data.grounding_conversation_mask_prob=-0.1"], 1,
            ["data.grounding_conversation_mask_prob = -0.1", "[0, 1]"],
            id="grounding-probability-range",
        ),
        pytest.param(
            ["data.resolution.min_pixels=300000"], 1, ["data.resolution.min_pixels = 300000", "data.resolution.max_pixels (200704)"],
            id="min-pixels-above-max",
        ),
        pytest.param(["train.seq_length=0"], 1, ["train.seq_length = 0", "> 0"], id="zero-seq-length"),
        pytest.param(
            ["model.lm.image_token_id=2048"], 1, ["model.lm.image_token_id = 2048", "2048"],
            id="image-token-outside-vocab",
        ),
        pytest.param(
            ["parallel.tensor=2", "model.lm.vocab_size=2049"], 2,
            ["model.lm.vocab_size = 2049", "divisible by parallel.tensor"],
            id="vocab-not-divisible-by-tp",
        ),
        pytest.param(
            ["model.vision.kind=vit"], 1, ["model.vision.kind = 'vit'", "qwen2_5_vl, qwen2_vl, siglip, clip"],
            id="bad-vision-kind",
        ),
        pytest.param(
            ["model.vision.kind=siglip"], 1,
            ["model.vision.norm = rmsnorm: model.vision.kind = siglip uses layernorm",
             "model.vision.mlp = swiglu: model.vision.kind = siglip uses gelu_tanh",
             "model.vision.temporal_patch_size = 2", "model.vision.image_size = 0", "384 for SigLIP"],
            id="siglip-with-qwen-fields",
        ),
        pytest.param(
            ["model.vision.image_size=224"], 1, ["model.vision.image_size = 224", "rotary positions", "set it to 0"],
            id="position-table-on-a-rope-tower",
        ),
        pytest.param(
            ["model.adapter.kind=mlp"], 1,
            ["model.vision.spatial_merge_size = 2: model.adapter.kind = mlp", "set it to 1"],
            id="patch-mlp-with-a-merge",
        ),
        pytest.param(
            ["model.adapter.norm=after"], 1, ["model.adapter.norm = after: merge_mlp normalises each patch"],
            id="merge-mlp-norm-after",
        ),
        pytest.param(
            ["model.adapter.kind=pixel_shuffle", "model.adapter.ffn_hidden_size=64"], 1,
            ["model.adapter.ffn_hidden_size = 64: model.adapter.kind = pixel_shuffle is one linear"],
            id="pixel-shuffle-has-no-hidden-layer",
        ),
        pytest.param(
            ["model.lm.image_positions=sequential"], 1,
            ["model.lm.image_positions = sequential: multimodal RoPE", "model.lm.rope = 1d"],
            id="sequential-positions-with-mrope",
        ),
        pytest.param(
            ["model.vision.kind=compression_first", "model.vision.norm=layernorm", "model.vision.mlp=gelu_quick",
             "model.vision.temporal_patch_size=1", "model.vision.image_size=112", "model.adapter.kind=merge_mlp"], 1,
            ["model.vision.window_stage.num_layers = 0: model.vision.kind = compression_first needs a window stage",
             "model.adapter.kind = merge_mlp: model.vision.kind = compression_first merges 2 x 2 patches in its own "
             "compressor"],
            id="compression-first-needs-a-window-stage-and-an-mlp-projector",
        ),
        pytest.param(
            ["model.vision.window_stage.num_layers=2"], 1,
            ["model.vision.window_stage.num_layers = 2: only model.vision.kind = compression_first has a window stage"],
            id="window-stage-of-another-tower",
        ),
        pytest.param(
            ["model.lm.head_dim=25"], 1, ["model.lm.head_dim = 25: must be even for rotary embeddings"],
            id="odd-head-dim",
        ),
        pytest.param(
            # 24-wide heads have 12 rotary pairs; the default sections give 16.
            ["model.lm.head_dim=24"], 1, ["model.lm.mrope_section = [4, 6, 6]", "head_dim // 2 = 12",
                                          "model.lm.head_dim = 24"],
            id="mrope-sections-follow-head-dim",
        ),
        pytest.param(
            ["model.lm.rope_scaling_factor=8"], 1,
            ["model.lm.rope_scaling_factor = 8.0: Llama 3's frequency scaling applies to 1-D RoPE", "not mrope"],
            id="rope-scaling-needs-1d-rope",
        ),
    ],
)
def test_validation_errors(overrides, world_size, fragments):
    message = problems_for(overrides, world_size)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_head_dim_need_not_divide_the_hidden_size():
    """Heads set apart from the width (Qwen3-0.6B: 16 of 128 on 1024; here 3 of 48 on 128)."""
    config = load_config(None, ["model.lm.num_attention_heads=3", "model.lm.num_query_groups=1",
                                "model.lm.head_dim=48", "model.lm.mrope_section=[8,8,8]"])
    validate(config, 1)
    from megavl.models.transformer_configs import lm_transformer_config

    assert lm_transformer_config(config).kv_channels == 48


def test_multiple_problems_reported_together():
    message = problems_for(
        [
            "parallel.tensor=8",
            "parallel.expert=2",
            "train.dtype=fp8",
            "model.lm.mrope_section=[1, 1, 1]",
            "train.warmup_steps=1000",
        ],
        world_size=8,
    )
    for fragment in (
        "model.lm.num_attention_heads = 4",
        "model.lm.num_query_groups = 2",
        "parallel.expert = 2",
        "train.dtype = 'fp8'",
        "model.lm.mrope_section = [1, 1, 1]",
        "train.warmup_steps = 1000",
    ):
        assert fragment in message
    assert "problems" in message


def test_valid_parallel_layouts():
    config = load_config(None, ["parallel.tensor=2", "parallel.sequence_parallel=true"])
    validate(config, 4)
    assert data_parallel_size(config, 4) == 2

    config = load_config(
        None,
        ["parallel.pipeline=3", "model.lm.num_layers=7", "parallel.first_stage_lm_layers=1",
         "train.global_batch_size=2"],
    )
    validate(config, 6)
    assert lm_layers_per_stage(config) == [1, 3, 3]
    assert data_parallel_size(config, 6) == 2

    config = load_config(None, ["parallel.pipeline=2"])
    validate(config, 2)
    assert lm_layers_per_stage(config) == [2, 2]


def test_data_parallel_size_rejects_indivisible_world():
    config = load_config(None, ["parallel.tensor=2"])
    with pytest.raises(ConfigError, match="world size 3"):
        data_parallel_size(config, 3)


def test_lm_layers_per_stage_rejects_bad_split():
    config = load_config(None, ["parallel.pipeline=2", "parallel.first_stage_lm_layers=4"])
    with pytest.raises(ConfigError, match="parallel.first_stage_lm_layers = 4"):
        lm_layers_per_stage(config)


# ---------------------------------------------------------------------------
# Serialisation and command line
# ---------------------------------------------------------------------------


def test_dict_round_trip():
    config = load_config(
        str(TINY), ["parallel.first_stage_lm_layers=2", "model.adapter.ffn_hidden_size=64"]
    )
    data = config_to_dict(config)
    assert config_from_dict(data) == config
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == config


def test_dump_config_round_trips_through_a_file(tmp_path):
    config = load_config(str(TINY))
    assert load_config(write(tmp_path, dump_config(config))) == config


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="valid keys in parallel"):
        config_from_dict({"parallel": {"tensr": 2}})


def test_loaded_fields_have_declared_types():
    config = load_config(str(TINY))
    for section in dataclasses.fields(config.train):
        value, kind = getattr(config.train, section.name), section.type
        if typing.get_origin(kind) is typing.Union:  # Optional[X]: None or an X
            if value is None:
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is typing.Literal:  # a choice: one of its values
            assert value in typing.get_args(kind), section.name
        else:
            assert isinstance(value, kind), section.name


def test_command_line_args():
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--config", str(TINY), "--set", "train.steps=3", "train.lr=1e-4", "--set", "train.seed=7"]
    )
    config = config_from_args(args)
    assert config.train.steps == 3
    assert config.train.lr == 1e-4
    assert config.train.seed == 7
    assert config.model.vision.window_size == 56


def test_command_line_defaults():
    parser = add_config_args(argparse.ArgumentParser())
    assert config_from_args(parser.parse_args([])) == Config()


def test_preemption_and_retention_settings_are_checked():
    message = problems_for(["checkpoint.resume=sometimes", "checkpoint.keep_last=-1", "checkpoint.keep_every=-2",
                            "train.max_wall_time=0"])
    for fragment in ("checkpoint.resume = 'sometimes': must be one of auto, never",
                     "checkpoint.keep_last = -1: must be >= 0", "checkpoint.keep_every = -2: must be >= 0",
                     "train.max_wall_time = 0.0: must be > 0"):
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    validate(load_config(None, ["train.max_wall_time=3600", "checkpoint.keep_last=3"]), 1)


def test_task_evaluation_settings_are_checked():
    validate(load_config(str(TINY), ["train.task_eval.interval=10"]), 2)
    text = problems_for(["train.task_eval.interval=0", "train.task_eval.samples=0", "train.task_eval.batch_size=0"])
    for name in ("train.task_eval.interval = 0", "train.task_eval.samples = 0", "train.task_eval.batch_size = 0"):
        assert name in text
    assert "data.val_path is not" in problems_for(["train.task_eval.interval=5", "data.val_path=null"])
    assert "parallel.pipeline = 2" in problems_for(["train.task_eval.interval=5", "parallel.pipeline=2",
                                                    "model.lm.num_layers=4"], world_size=2)
    assert "sequence_parallel" in problems_for(["train.task_eval.interval=5", "parallel.tensor=2",
                                                "parallel.sequence_parallel=true"], world_size=2)
    # Off (the default), nothing about it is checked.
    validate(load_config(None, ["train.task_eval.samples=0", "data.val_path=null"]), 1)


def test_perf_switches_are_decided_with_reasons_and_bad_ones_refused():
    from megavl.platform.features import Platform
    from megavl.platform.perf import overlap_grad_reduce, overlap_param_gather, perf_plan

    gpu = Platform(cuda=True, device_count=8, transformer_engine=True, apex=True, dali=True, flex_attention=True)
    cpu = Platform(cuda=False, device_count=0, transformer_engine=False, apex=False, dali=False, flex_attention=True)
    config = load_config(None)
    assert overlap_grad_reduce(config, 8, gpu).on and overlap_param_gather(config, 8, gpu).on
    assert not overlap_grad_reduce(config, 8, cpu).on and not overlap_param_gather(config, 8, cpu).on
    assert not overlap_grad_reduce(config, 1, gpu).on  # nothing to reduce
    # The gather overlaps only with the reduce, and only shards the distributed optimizer made.
    asked = load_config(None, ["perf.overlap_param_gather=true"])
    assert overlap_grad_reduce(asked, 1, cpu).on
    muon = load_config(None, ["train.optimizer=muon"])
    assert not overlap_param_gather(muon, 8, gpu).on
    assert re.search(r"overlap_grad_reduce +off +auto: off without a GPU", perf_plan(config, 8, cpu))

    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["perf.overlap_param_gather=true", "perf.overlap_grad_reduce=false",
                                    "parallel.distributed_optimizer=false", "perf.bucket_size=0"]), 1)
    text = str(info.value)
    assert "perf.bucket_size = 0: must be a positive number" in text
    assert "perf.overlap_param_gather = true: needs the distributed optimizer" in text
    assert "parallel.distributed_optimizer = false" in text
    assert "perf.overlap_param_gather = true: needs perf.overlap_grad_reduce" in text

    with pytest.raises(ConfigError) as info:
        validate(load_config(None, ["perf.recompute_lm_layers=2", "perf.recompute_vision=full", "train.dropout=0.1"]), 1)
    text = str(info.value)
    assert "perf.recompute_lm_layers = 2: counts the recomputed LM layers of perf.recompute_lm = full" in text
    assert "perf.recompute_vision = full: needs train.dropout = 0 (it is 0.1)" in text
    with pytest.raises(ConfigError, match="a pipeline stage has only 2 LM layers"):
        validate(load_config(None, ["perf.recompute_lm=full", "perf.recompute_lm_layers=3", "parallel.pipeline=2"]), 2)


def test_fused_kernels_asked_for_are_refused_where_they_cannot_run():
    from megavl.platform.features import Platform
    from megavl.platform.perf import fusion_platform_problems, fusions, transformer_fields

    gpu = Platform(cuda=True, device_count=8, transformer_engine=True, apex=True, dali=True, flex_attention=True)
    cpu = Platform(cuda=False, device_count=0, transformer_engine=False, apex=False, dali=False, flex_attention=True)
    config = load_config(None, ["model.lm.vision_lora.mlp_rank=0", "model.lm.vision_lora.attn_rank=0"])
    on = {name: switch.on for name, switch in fusions(config, gpu).items()}
    # mrope (the default LM) has one position table per row: TE's fused RoPE stays off.
    assert on == {"gradient_accumulation_fusion": True, "bias_activation_fusion": True, "rope_fusion": False,
                  "moe_permute_fusion": False, "cross_entropy_fusion": True}
    assert not any(switch.on for switch in fusions(config, cpu).values())
    assert transformer_fields(config, "lm", gpu)["cross_entropy_fusion_impl"] == "te"
    assert set(transformer_fields(config, "vision", gpu)) == {"gradient_accumulation_fusion"}

    asked = load_config(None, ["perf.gradient_accumulation_fusion=true", "perf.rope_fusion=true",
                               "perf.moe_permute_fusion=true", "perf.cross_entropy_fusion=true"])
    problems = "\n".join(fusion_platform_problems(asked, cpu))
    assert "perf.gradient_accumulation_fusion = true: it needs a CUDA GPU" in problems
    assert "perf.rope_fusion = true: it needs a CUDA GPU" in problems
    assert "perf.moe_permute_fusion = true: it needs a CUDA GPU" in problems
    assert "perf.cross_entropy_fusion = true: megatron's own fused cross-entropy" in problems
    assert "train.dtype = fp32" in problems
    on_gpu = "\n".join(fusion_platform_problems(asked, gpu))
    assert "model.lm.rope = mrope: TE's fused RoPE takes one position table" in on_gpu
    assert "perf.moe_permute_fusion = true: the LM has no experts" in on_gpu
    # megatron's own fused cross-entropy runs on the CPU, in bf16.
    assert not fusion_platform_problems(load_config(None, ["perf.cross_entropy_fusion=true", "train.dtype=bf16"]), cpu)


def test_the_trainer_sets_one_cuda_connection_under_tensor_parallelism_unless_told_otherwise():
    from megavl.platform.perf import cuda_connection_setting

    assert cuda_connection_setting(load_config(None, ["parallel.tensor=2"]), {}) == "1"
    assert cuda_connection_setting(load_config(None, ["parallel.tensor=2"]), {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}) is None
    assert cuda_connection_setting(load_config(None), {}) is None
