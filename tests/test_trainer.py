"""pretrain_vlm.py end to end on CPU: learning, logs, layouts, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import NO_TASK_EVAL, ROOT, TINY_CONFIG, _free_port
from trainer_runs import _metrics, _overrides, _train, data_dir  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.slow


def test_single_process_learns_and_writes_logs_and_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    schedule = ["data.max_pixels_schedule.start_max_pixels=6272", "data.max_pixels_schedule.fraction=0.5",
                "data.max_pixels_schedule.stages=2"]
    stdout = _train(1, _overrides(data_dir, run, steps=16, extra=schedule, image_backend="auto"))
    train, val = _metrics(run)
    # Two stages over the first 8 steps (the loader is rebuilt at each change), then the full cap.
    caps = [r["max_pixels"] for r in train]
    assert caps[:4] == [6272] * 4 and len(set(caps[4:8])) == 1 and 6272 < caps[4] < 12544 and caps[8:] == [12544] * 8
    assert [r["step"] for r in train] == list(range(1, 17))
    for key in ("loss", "lr", "grad_norm", "answer_tokens", "tokens_per_s", "packing_efficiency", "step_time",
                "tflops_per_gpu"):
        assert key in train[0]
    first, last = sum(r["loss"] for r in train[:4]) / 4, sum(r["loss"] for r in train[-4:]) / 4
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert [r["step"] for r in val] == [4, 8, 12, 16]
    assert "ETA" in stdout and "checkpoint:" in stdout
    assert "(data.image_backend = auto)" in stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 16
    assert len(events.Scalars("val/loss")) == 4
    with open(run / "checkpoints" / "latest") as f:
        assert f.read().strip() == "iter_0000016"


@pytest.fixture(scope="module")
def reference_losses(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    _train(1, _overrides(data_dir, run, steps=6))
    train, _ = _metrics(run)
    return run, [r["loss"] for r in train], [r["answer_tokens"] for r in train]


# DP2 decodes its images after the loader (data.decode_images_in = trainer), each rank its own
# share of the balanced step, and exchanges the failures so both count the whole stream.
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.pipeline=2", NO_TASK_EVAL],
                                    ["data.decode_images_in=trainer"]], ids=["TP2", "PP2", "DP2-trainer-decode"])
def test_parallel_layouts_train_like_one_process(data_dir, tmp_path, reference_losses, layout):
    _, losses, tokens = reference_losses
    run = tmp_path / "run"
    stdout = _train(2, _overrides(data_dir, run, steps=6, extra=layout))
    if "data.decode_images_in=trainer" in layout:
        assert "images decoded in the training process on cpu, after the loader" in stdout
    train, _ = _metrics(run)
    assert [r["answer_tokens"] for r in train] == tokens
    assert [r["loss"] for r in train] == pytest.approx(losses, rel=1e-5)


def test_resume_continues_exactly(data_dir, tmp_path, reference_losses):
    """Restart from the step-3 checkpoint of the reference run: steps 4-6 repeat exactly."""
    reference_run, losses, tokens = reference_losses
    run = tmp_path / "resumed"
    _train(1, _overrides(data_dir, run, steps=6,
                         extra=[f"checkpoint.load={reference_run}/checkpoints/iter_0000003"]))
    train, _ = _metrics(run)
    assert [r["step"] for r in train] == [4, 5, 6]
    assert [r["answer_tokens"] for r in train] == tokens[3:]
    assert [r["loss"] for r in train] == losses[3:]


def test_a_checkpoint_under_overlapped_parameter_gather_holds_the_updated_weights(data_dir, tmp_path):
    """perf.overlap_param_gather leaves the step's updated shards to the next forward's all-gather;
    a save gathers them first. A restart from step 3 without the gather overlap (whose first
    forward gathers nothing) but in the same gradient buckets (so the optimizer state loads)
    repeats steps 4-6 exactly; weights saved before the gather would change them."""
    buckets = ["perf.overlap_grad_reduce=true", "perf.bucket_size=20000"]
    run = tmp_path / "overlap"
    out = _train(2, _overrides(data_dir, run, steps=6, extra=[*buckets, "perf.overlap_param_gather=true"]))
    assert re.search(r"overlap_param_gather +on +perf.overlap_param_gather = true", out)
    train, _ = _metrics(run)
    resumed = tmp_path / "resumed"
    out = _train(2, _overrides(data_dir, resumed, steps=6,
                               extra=[*buckets, "perf.overlap_param_gather=false",
                                      f"checkpoint.load={run}/checkpoints/iter_0000003"]))
    assert re.search(r"overlap_param_gather +off", out)
    again, _ = _metrics(resumed)
    assert [r["step"] for r in again] == [4, 5, 6]
    assert [r["loss"] for r in again] == [r["loss"] for r in train[3:]]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in train[3:]]


def test_muon_with_its_layer_wise_distributed_state_resumes_exactly_at_dp2(data_dir, tmp_path):
    """train.optimizer=muon over DP=2: each rank keeps the state of its own weights; a restart
    from step 3 repeats steps 4-6 exactly (the momentum buffers come back)."""
    muon = ["train.optimizer=muon", "parallel.distributed_optimizer=true"]
    run = tmp_path / "muon"
    out = _train(2, _overrides(data_dir, run, steps=6, extra=muon))
    assert "optimizer: Muon for " in out and " tensors (" in out
    train, _ = _metrics(run)
    resumed = tmp_path / "resumed"
    _train(2, _overrides(data_dir, resumed, steps=6, extra=[*muon, f"checkpoint.load={run}/checkpoints/iter_0000003"]))
    again, _ = _metrics(resumed)
    assert [r["step"] for r in again] == [4, 5, 6]
    assert [r["loss"] for r in again] == [r["loss"] for r in train[3:]]
    assert [r["grad_norm"] for r in again] == [r["grad_norm"] for r in train[3:]]


def test_a_dataset_failing_too_often_stops_the_run_with_its_name(data_dir, tmp_path):
    # One image per pack: every two-image sample fails (about one in six).
    overrides = _overrides(data_dir, tmp_path / "run", steps=30, extra=[
        "data.max_images_per_pack=1", "data.failure_check_min_samples=20", "data.max_failure_rate=0.05"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(_free_port()), str(ROOT / "pretrain_vlm.py"),
               "--config", str(TINY_CONFIG), "--set", *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode != 0
    assert re.search(r"DataFailureRateError: dataset 'train': \d+ of \d+ records failed .*too_many_images", result.stderr)
    assert "skipped sample" in result.stderr and "too_many_images" in result.stderr


def test_dry_run_prints_layout_and_parameter_counts():
    command = [sys.executable, str(ROOT / "pretrain_vlm.py"), "--config", str(TINY_CONFIG), "--dry-run",
               "--world-size", "4", "--set", "parallel.tensor=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "world=4 = TP 2 x PP 1 x DP 2" in result.stdout
    assert "parameters           total" in result.stdout


def test_dry_run_of_a_bad_config_names_every_problem_without_a_traceback():
    command = [sys.executable, str(ROOT / "pretrain_vlm.py"), "--config", str(TINY_CONFIG), "--dry-run",
               "--set", "perf.bucket_size=0", "perf.recompute_lm_layers=2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid configuration for world size 1 (2 problems)"), result.stderr
    assert "perf.bucket_size = 0" in result.stderr and "perf.recompute_lm_layers = 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("tower, extra", [
    ("siglip", []),
    ("clip", []),
    # A fixed regime of 12 tokens, not a square number: every image a 3 x 4 grid.
    ("clip", ["data.resolution.fixed_tokens=12"]),
    # compression_first on 64 px tiles plus the global view.
    ("roaya", []),
], ids=["siglip", "clip", "clip-3x4-grid", "compression-first"])
def test_other_towers_and_projectors_learn_through_the_whole_pipeline(data_dir, tmp_path, tower, extra):
    """tiny_siglip_cpu (SigLIP, pixel shuffle, sequential 1-D positions) and tiny_clip_cpu (CLIP,
    LLaVA's MLP): the loader's fixed-size resolution policy, the tower, the projector and the LM."""
    run = tmp_path / tower
    config = ROOT / "examples" / "configs" / f"tiny_{tower}_cpu.yaml"
    _train(1, _overrides(data_dir, run, steps=12, extra=[NO_TASK_EVAL, *extra]), config=config)
    train, val = _metrics(run)
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 1.0, f"{tower}: loss did not fall: {first:.3f} -> {last:.3f}"
    assert val[-1]["val_loss"] < val[0]["val_loss"]


def test_the_tiny_smolvlm_learns_on_tiles_and_exports_to_idefics3(megatron_world, data_dir, tmp_path):
    """tiny_smolvlm_cpu: the tiling policy (tiles + global view) through SigLIP, pixel shuffle and a
    Llama-style LM; the trained checkpoint exports to Idefics3ForConditionalGeneration with logits
    verified."""
    from megavl.convert import export_to_hf

    run = tmp_path / "smolvlm"
    config = ROOT / "examples" / "configs" / "tiny_smolvlm_cpu.yaml"
    _train(1, _overrides(data_dir, run, steps=12, extra=[NO_TASK_EVAL]), config=config)
    train, val = _metrics(run)
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    result = export_to_hf(str(run / "checkpoints"), str(tmp_path / "hf"), tokenizer=f"{data_dir}/tokenizer",
                          verify=True, log=lambda _: None)
    assert result.architecture == "Idefics3ForConditionalGeneration"
    assert result.verification.ok, result.verification.describe()


def test_moe_with_expert_parallelism_learns_and_reports_router_metrics(data_dir, tmp_path):
    run = tmp_path / "moe"
    moe_config = ROOT / "examples" / "configs" / "tiny_moe_cpu.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_free_port()), str(ROOT / "pretrain_vlm.py"),
               "--config", str(moe_config), "--set", *_overrides(data_dir, run, steps=12),
               # Task accuracy on both data-parallel ranks' shares, decoding in lockstep (EP=2).
               "train.task_eval.interval=6", "train.task_eval.samples=7", "train.task_eval.max_new_tokens=6",
               "train.task_eval.batch_size=3"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-6000:]
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    _check_task_evaluation(rows, run, result.stdout, data_dir, samples=7, steps=[6, 12])
    train = [r for r in rows if "loss" in r]
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert all(r["moe_load_balancing_loss"] > 0 and r["moe_z_loss"] > 0 for r in train)

    records = [r["moe"] for r in rows if "moe" in r]
    assert len(records) == 12
    top_k = 2
    for record in records:
        # Layer 1 is dense (dense_layers: [0]); layers 2-4 route every token to top_k experts.
        assert sorted(record["expert_load"]) == ["2", "3", "4"]
        for layer, load in record["expert_load"].items():
            assert len(load["text"]) == len(load["vision"]) == 4
            assert sum(load["text"]) + sum(load["vision"]) == record["routed_tokens"][layer] * top_k
            assert sum(load["vision"]) > 0  # the batches have images
        assert record["routed_tokens"]["2"] == 2 * 256  # global batch 2 rows x seq 256
        assert record["router_losses"]["load_balancing_loss"][0] == 0.0  # the dense layer

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "moe/expert_load" in events.Tags()["images"]


def _check_task_evaluation(rows, run, stdout, data_dir, samples, steps):
    """Task accuracy was logged at the given steps: every answer of the first records counted once
    over the ranks' shares, to metrics.jsonl, TensorBoard (scalars and example answers), the
    console and metrics.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megavl.eval.items import load_items

    items = load_items(str(data_dir / "val"), samples)
    tasks = [r for r in rows if "task_all/accuracy" in r]
    assert [r["step"] for r in tasks] == steps
    for row in tasks:
        assert 0.0 <= row["task_all/accuracy"] <= 1.0 and row["task_skipped"] == {}
        assert {k for k in row if k.endswith("/accuracy")} == {"task_all/accuracy"} | {
            f"task_{item.group}/accuracy" for item in items}
    assert stdout.count("| task accuracy") == len(steps)
    assert re.search(rf"\nall +{len(items)} +[0-9.]+%", stdout), stdout[-3000:]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("task/all/accuracy")] == steps
    assert "task/examples/text_summary" in events.Tags()["tensors"]
    assert (run / "metrics.png").stat().st_size > 10_000

