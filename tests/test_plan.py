"""The capacity planner (tools/plan.py, megavl/planning/) against the dry run, built models and hand counts.

* Parameter counts equal the dry run's and a built model's, and the planner's split of
  every parameter (whole / over TP / over EP) is the one megatron marks on the built model.
* Weight, gradient and optimizer bytes per GPU equal a hand computation, for a layout
  change too (TP = 2 halves the split parameters; the distributed optimizer divides the
  state by the data-parallel or expert-data-parallel size; a pipeline's last stage holds
  the tied embedding's copy).
* The activation estimate is within ACTIVATION_TOLERANCE (1%) of the bytes autograd saves
  for backward in a measured forward of the tiny dense and MoE models on the CPU, at two
  sequence lengths, and within TORCHRUN_TOLERANCE (10%) on each rank of a TP 2 + SP + EP 2
  run (the routing there is not perfectly balanced, which the estimate assumes).
* Layouts that cannot divide or do not fit are refused with the reason and a non-zero exit
  status; the flagship config plans on 16 nodes x 8 H200; --suggest lists fitting layouts
  best first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, _free_port

CONFIGS = ROOT / "examples" / "configs"
FLAGSHIP = str(CONFIGS / "moe_8b_a1b.yaml")
# The estimate inventories exactly what autograd saves, so on one CPU process it agrees to
# within a few hundred bytes; 1% leaves room for small library changes while still catching
# a missing or double-counted tensor of one expert FFN width per routed row (about 4% here).
ACTIVATION_TOLERANCE = 0.01
TORCHRUN_TOLERANCE = 0.10


def _load_script(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plan_tool():
    return _load_script("plan_tool_under_test", ROOT / "tools" / "plan.py")


def _config(name: str, overrides=()):
    from megavl.config import load_config

    return load_config(str(CONFIGS / name), list(overrides))


def _cluster(nodes: int, gpus_per_node: int, gpu: str = "h100"):
    from megavl.planning import Cluster, gpu_by_name

    return Cluster(nodes, gpus_per_node, gpu_by_name(gpu))


# --------------------------------------------------------------------------- #
# Parameters
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name,overrides", [
    ("tiny_cpu.yaml", []),
    ("tiny_moe_cpu.yaml", ["parallel.expert=1"]),
    ("tiny_cpu.yaml", ["model.vision.kind=qwen2_vl", "model.vision.norm=layernorm", "model.vision.mlp=gelu_quick",
                       "model.lm.tie_embeddings=false", "model.lm.qk_layernorm=true", "model.lm.head_dim=48",
                       "model.lm.mrope_section=[8,8,8]"]),
    ("tiny_siglip_cpu.yaml", []),
    ("tiny_clip_cpu.yaml", ["model.adapter.norm=after", "model.adapter.bias=false"]),
    ("tiny_roaya_cpu.yaml", []),
], ids=["dense", "moe", "variants", "siglip", "clip", "compression-first"])
def test_parameter_counts_agree_with_the_dry_run_and_the_built_model(megatron_world, capsys, name, overrides):
    from megavl.models.build import build_model, local_parameter_counts
    from megavl.planning.parameters import gpu_parameters, model_parameters, parameter_groups

    config = _config(name, overrides)
    planned = model_parameters(config)

    _load_script("pretrain_vlm_for_plan_test", ROOT / "pretrain_vlm.py").dry_run(config, 1)
    printed = capsys.readouterr().out
    dry_run = {m[0]: int(m[1].replace(",", "")) for m in re.findall(r"parameters\s+(\w+): +([\d,]+)", printed)}
    active = int(re.search(r"LM parameters active per token: ([\d,]+)", printed).group(1).replace(",", ""))
    assert {name: c.total for name, c in planned.items()} == {k: v for k, v in dry_run.items() if k != "total"}
    assert planned["language_model"].active == active

    model = build_model(config)
    assert local_parameter_counts(model) == {name: c.total for name, c in planned.items()}
    assert gpu_parameters(config, 0).by_component == local_parameter_counts(model)

    # The split the planner divides by is the one megatron marks on the parameters.
    built, grouped = {}, {}
    for component in planned:
        for param_name, param in getattr(model, component).named_parameters():
            kind = ("expert" if ".experts." in param_name
                    else "tensor" if getattr(param, "tensor_model_parallel", False) else "replicated")
            built[component, kind] = built.get((component, kind), 0) + param.numel()
    for group in parameter_groups(config):
        kind = "expert" if group.is_expert else group.shard
        grouped[group.component, kind] = grouped.get((group.component, kind), 0) + group.count
    assert grouped == built


# --------------------------------------------------------------------------- #
# Weights, gradients, optimizer state
# --------------------------------------------------------------------------- #

# tiny_cpu.yaml by hand: what stays whole on every TP rank and what is split over TP.
TINY_VISION_WHOLE = 64 * 1176 + 4 * (2 * 64 + 64 + 64)  # patch embedding; norms, proj and fc2 biases
TINY_VISION_SPLIT = 4 * (3 * 64 * 64 + 3 * 64 + 64 * 64 + 2 * 128 * 64 + 2 * 128 + 128 * 64)
TINY_ADAPTER_WHOLE = 64 + 128  # norm, fc2 bias
TINY_ADAPTER_SPLIT = 256 * 256 + 256 + 256 * 128
# Per LM layer: norms, attention LoRA (r 8) and MLP LoRA (r 32) factors on the unsplit side; final norm.
TINY_LM_WHOLE = 4 * (2 * 128 + 2 * 8 * 128 + 2 * 32 * 128) + 128
TINY_LM_LAYER_SPLIT = 256 * 128 + 256 + 128 * 128 + 256 * 8 + 8 * 128 + 3 * 344 * 128 + 2 * 344 * 32 + 32 * 344
TINY_EMBEDDING = 2048 * 128
TINY_TOTAL = (TINY_VISION_WHOLE + TINY_VISION_SPLIT + TINY_ADAPTER_WHOLE + TINY_ADAPTER_SPLIT + TINY_LM_WHOLE
              + TINY_EMBEDDING + 4 * TINY_LM_LAYER_SPLIT)


def _state(config, world_size, stage=0):
    from megavl.planning.memory import state_memory
    from megavl.planning.parameters import gpu_parameters

    return state_memory(config, gpu_parameters(config, stage), world_size)


def test_dense_state_bytes_by_hand_and_when_tp_2_halves_the_split_parameters():
    from megavl.models.param_count import total_parameter_counts

    bf16 = ["train.dtype=bf16"]
    assert sum(total_parameter_counts(_config("tiny_cpu.yaml")).values()) == TINY_TOTAL

    # 4 GPUs, pure data parallel: bf16 weights, fp32 gradients, Adam m, v and fp32 master
    # weights (12 B) sharded 4 ways by the distributed optimizer, or whole without it.
    state = _state(_config("tiny_cpu.yaml", bf16), 4)
    assert (state.weights, state.gradients, state.optimizer) == (2 * TINY_TOTAL, 4 * TINY_TOTAL, 12 * TINY_TOTAL // 4)
    unsharded = _state(_config("tiny_cpu.yaml", bf16 + ["parallel.distributed_optimizer=false"]), 4)
    assert unsharded.optimizer == 12 * TINY_TOTAL
    fp32 = _state(_config("tiny_cpu.yaml"), 4)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * TINY_TOTAL, 4 * TINY_TOTAL, 8 * TINY_TOTAL // 4)

    # TP 2 on the same 4 GPUs: the split parameters halve, the whole ones stay; DP becomes 2.
    tp2 = _state(_config("tiny_cpu.yaml", bf16 + ["parallel.tensor=2", "parallel.sequence_parallel=true"]), 4)
    split = TINY_VISION_SPLIT + TINY_ADAPTER_SPLIT + TINY_EMBEDDING + 4 * TINY_LM_LAYER_SPLIT
    per_gpu = TINY_TOTAL - split // 2
    assert (tp2.weights, tp2.gradients, tp2.optimizer) == (2 * per_gpu, 4 * per_gpu, 12 * per_gpu // 2)


def test_expert_state_is_split_over_ep_and_sharded_over_the_expert_data_parallel_group():
    from megavl.models.param_count import total_parameter_counts

    config = _config("tiny_moe_cpu.yaml", ["train.dtype=bf16"])  # EP 2
    total = sum(total_parameter_counts(config).values())
    # 3 MoE layers x 4 experts x (SwiGLU 3*172*128 + vision LoRA r 32 on fc1 and fc2).
    experts = 3 * 4 * (3 * 172 * 128 + 32 * (128 + 2 * 172) + 32 * (172 + 128))
    dense = total - experts
    # 4 GPUs: DP 4 for dense parameters; EP 2 leaves 2 copies of each expert (EDP 2).
    state = _state(config, 4)
    assert state.weights == 2 * (dense + experts // 2)
    assert state.optimizer == 12 * (dense // 4 + experts // 2 // 2)
    # EP 1: every GPU holds every expert, and the expert state is sharded over all 4.
    whole = _state(_config("tiny_moe_cpu.yaml", ["train.dtype=bf16", "parallel.expert=1"]), 4)
    assert whole.weights == 2 * (dense + experts)
    assert whole.optimizer == 12 * (dense // 4 + experts // 4)


def test_pipeline_stages_hold_the_vision_tower_first_and_the_tied_embedding_copy_last():
    from megavl.planning.parameters import gpu_parameters

    config = _config("tiny_cpu.yaml", ["parallel.pipeline=2"])
    layer = (TINY_LM_WHOLE - 128) // 4 + TINY_LM_LAYER_SPLIT
    first = gpu_parameters(config, 0)
    last = gpu_parameters(config, 1)
    assert first.total == (TINY_VISION_WHOLE + TINY_VISION_SPLIT + TINY_ADAPTER_WHOLE + TINY_ADAPTER_SPLIT
                           + TINY_EMBEDDING + 2 * layer)
    assert last.total == 2 * layer + 128 + TINY_EMBEDDING  # final norm and the tied output copy
    untied = gpu_parameters(_config("tiny_cpu.yaml", ["parallel.pipeline=2", "model.lm.tie_embeddings=false"]), 1)
    assert untied.total == last.total  # its own output layer instead of the copy
    assert gpu_parameters(_config("tiny_cpu.yaml"), 0).total == TINY_TOTAL  # one stage: one copy


# --------------------------------------------------------------------------- #
# Activations
# --------------------------------------------------------------------------- #

IMAGES_PER_ROW, IMAGE_SIDE = 2, 224


def _probe_config(name, overrides, seq_length):
    from megavl.planning.measured import vision_tokens_per_row

    config = _config(name, [*overrides, f"train.seq_length={seq_length}"])
    tokens = vision_tokens_per_row(config, IMAGES_PER_ROW, IMAGE_SIDE)
    return _config(name, [*overrides, f"train.seq_length={seq_length}", f"data.max_vision_tokens_per_pack={tokens}"])


@pytest.mark.parametrize("name,overrides", [
    ("tiny_cpu.yaml", []),
    ("tiny_moe_cpu.yaml", ["parallel.expert=1"]),
    ("tiny_moe_cpu.yaml", ["parallel.expert=1", "train.dtype=bf16"]),
], ids=["dense", "moe", "moe-bf16"])
def test_activation_estimate_matches_the_bytes_saved_for_backward(megatron_world, name, overrides):
    """Within ACTIVATION_TOLERANCE (1%) at 256 and 512 tokens, and the same per added token."""
    import torch

    from megavl.models.build import build_model
    from megavl.planning.activations import stage_activations
    from megavl.planning.measured import measure_forward, probe_microbatch
    from megavl.platform.features import detect

    torch.manual_seed(0)
    model = build_model(_probe_config(name, overrides, 256))
    results = {}
    for seq_length in (256, 512):
        config = _probe_config(name, overrides, seq_length)
        measured = measure_forward(model, config, probe_microbatch(config, IMAGES_PER_ROW, IMAGE_SIDE), detect())
        estimated = stage_activations(config, 0, 1, device="cpu").per_microbatch_total
        results[seq_length] = (measured, estimated)
        assert estimated == pytest.approx(measured, rel=ACTIVATION_TOLERANCE), (seq_length, measured, estimated)
    measured_growth = results[512][0] - results[256][0]
    estimated_growth = results[512][1] - results[256][1]
    assert estimated_growth == pytest.approx(measured_growth, rel=ACTIVATION_TOLERANCE)


def test_activation_estimate_holds_on_every_rank_under_tp_sp_and_ep(tmp_path):
    """Two processes, TP 2 with sequence parallelism and EP 2: each rank's measured bytes and parameters."""
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), str(ROOT / "benchmarks" / "plan_activation_check.py"),
               "--config", str(CONFIGS / "tiny_moe_cpu.yaml"),
               "--set", "parallel.tensor=2", "parallel.sequence_parallel=true",
               "--tolerance", str(TORCHRUN_TOLERANCE), "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = json.loads(out.read_text())
    assert sorted((r["rank"], r["seq_length"]) for r in rows) == [(0, 256), (0, 512), (1, 256), (1, 512)]
    for row in rows:
        assert abs(row["error"]) <= TORCHRUN_TOLERANCE, row
        assert all(built == planned for built, planned in row["parameters"].values()), row


def test_pipeline_keeps_microbatches_in_flight_and_recompute_keeps_layer_inputs():
    from megavl.planning.activations import lm_layer_bytes, stage_activations

    config = _config("tiny_cpu.yaml", ["parallel.pipeline=4", "train.global_batch_size=16"])  # 8 microbatches
    first = stage_activations(config, 0, microbatches=8)
    last = stage_activations(config, 3, microbatches=8)
    assert (first.in_flight, last.in_flight) == (4, 1)
    assert first.total == pytest.approx(4 * first.per_microbatch_total)
    assert stage_activations(config, 0, microbatches=2).in_flight == 2
    assert first.vision_tower > 0 and last.vision_tower == 0

    full = stage_activations(config, 0, microbatches=8, recompute="full")
    # One layer on stage 0: it keeps its input (b*s*h fp32) and is rebuilt once in backward.
    layer_input = 2 * 512 * 128 * 4
    one_layer = sum(lm_layer_bytes(config, 0, "cuda").values())
    assert full.per_microbatch_total == pytest.approx(first.per_microbatch_total - one_layer + layer_input)
    assert full.working["one LM layer being recomputed"] == pytest.approx(one_layer)


# --------------------------------------------------------------------------- #
# FLOPs and time
# --------------------------------------------------------------------------- #


def test_flops_per_step_follow_the_stated_formula():
    from megavl.planning.flops import step_flops, step_time
    from megavl.planning.parameters import model_parameters

    config = _config("moe_8b_a1b.yaml")
    lm, t = config.model.lm, config.train
    flops = step_flops(config)
    tokens = t.global_batch_size * t.seq_length
    untied_input_embedding = lm.vocab_size * lm.hidden_size
    assert flops.lm_dense == 6 * (model_parameters(config)["language_model"].active - untied_input_embedding) * tokens
    assert flops.lm_attention == 6 * lm.num_layers * t.seq_length**2 * lm.hidden_size * t.global_batch_size
    patches = t.global_batch_size * config.data.max_vision_tokens_per_pack * 4
    assert flops.vision_dense == 6 * (model_parameters(config)["vision"].total * patches
                                      + model_parameters(config)["adapter"].total * patches // 4)
    cluster = _cluster(16, 8, "h200")
    time = step_time(config, cluster, microbatches=4, mfu=0.4)
    assert time.seconds == pytest.approx(flops.model / (128 * 989e12 * 0.4))
    assert time.tokens_per_second == pytest.approx(tokens / time.seconds)
    # Tied embeddings: the one matrix is the output layer's matmul, so nothing is taken off.
    tiny = _config("tiny_cpu.yaml")
    assert step_flops(tiny).lm_dense == 6 * model_parameters(tiny)["language_model"].active * 4 * 512
    # The pipeline bubble and full recomputation slow a step down.
    piped = _config("moe_8b_a1b.yaml", ["parallel.pipeline=2"])
    assert step_time(piped, cluster, 8, 0.4).seconds == pytest.approx(time.seconds * (1 + 1 / 8))
    assert step_flops(config, "full").hardware > flops.hardware


# --------------------------------------------------------------------------- #
# The tool: refusals, the flagship, suggestions
# --------------------------------------------------------------------------- #


def test_a_layout_that_cannot_divide_is_refused_with_validations_reasons(plan_tool, capsys):
    status = plan_tool.main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "3",
                             "--gpu", "h100", "--set", "parallel.tensor=2"])
    out = capsys.readouterr().out
    assert status == plan_tool.EXIT_INVALID != 0
    assert "REFUSED" in out
    assert "world size 3: must be divisible by parallel.tensor * parallel.pipeline * parallel.context" in out
    # megatron's vocab-parallel embedding splits the vocabulary evenly over TP ranks.
    status = plan_tool.main(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "2",
                             "--gpu", "h100", "--set", "parallel.tensor=2", "model.lm.vocab_size=2049"])
    out = capsys.readouterr().out
    assert status == plan_tool.EXIT_INVALID
    assert "model.lm.vocab_size = 2049" in out and "divisible by parallel.tensor" in out


def test_a_layout_that_does_not_fit_exits_non_zero_with_the_reason():
    command = [sys.executable, str(ROOT / "tools" / "plan.py"), "--config", FLAGSHIP, "--nodes", "1",
               "--gpus-per-node", "8", "--gpu", "h100", "--set", "parallel.tensor=1", "parallel.pipeline=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    reason = re.search(r"pipeline stage 0: ([\d.]+) GiB per GPU .* is over the usable ([\d.]+) GiB of a h100 "
                       r".* by ([\d.]+) GiB", result.stdout)
    assert reason, result.stdout
    needed, usable, over = map(float, reason.groups())
    assert over == pytest.approx(needed - usable, abs=0.11) and over > 0


def test_the_flagship_plans_on_16_nodes_of_8_h200(plan_tool, capsys):
    from megavl.models.param_count import total_parameter_counts
    from megavl.planning import PlanOptions, make_plan

    status = plan_tool.main(["--config", FLAGSHIP, "--nodes", "16", "--gpus-per-node", "8", "--gpu", "h200"])
    out = capsys.readouterr().out
    assert status == plan_tool.EXIT_FITS, out
    assert "FITS" in out and "REFUSED" not in out
    for name, count in total_parameter_counts(_config("moe_8b_a1b.yaml")).items():
        assert re.search(rf"{name}\s+{count:,d}\s", out), name
    plan = make_plan(_config("moe_8b_a1b.yaml"), _cluster(16, 8, "h200"), PlanOptions())
    assert (plan.data_parallel, plan.expert_data_parallel, plan.microbatches) == (128, 16, 4)
    assert f"{plan.time.seconds:.3g} s" in out


def test_suggest_lists_only_fitting_layouts_best_first(plan_tool, capsys):
    from megavl.planning import PlanOptions, make_plan, suggest
    from megavl.planning.capacity import layout_problems
    from megavl.planning.layouts import candidate_plans, ranking_key

    config, cluster = _config("moe_8b_a1b.yaml"), _cluster(1, 8, "h100")
    plans = suggest(config, cluster)
    assert plans
    assert [ranking_key(p) for p in plans] == sorted(ranking_key(p) for p in plans)
    for plan in plans:
        assert not layout_problems(plan.config, cluster.world_size)
        assert plan.most_loaded.total <= plan.usable_bytes
        assert make_plan(plan.config, cluster, PlanOptions()).fits
    # The filter is real: the configured layout (TP 1, EP 8) is valid here but does not fit.
    refused = [p for p in candidate_plans(config, cluster, PlanOptions()) if not p.fits]
    assert any((p.config.parallel.tensor, p.config.parallel.expert) == (1, 8) for p in refused)

    status = plan_tool.main(["--config", FLAGSHIP, "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100",
                             "--suggest"])
    out = capsys.readouterr().out
    assert status == plan_tool.EXIT_DOES_NOT_FIT  # the configured layout's verdict
    assert f"suggestions: {len(plans)} layout(s) fit" in out
    best = plans[0].config.parallel
    assert f"parallel.tensor={best.tensor} parallel.pipeline={best.pipeline} parallel.expert={best.expert}" in out
