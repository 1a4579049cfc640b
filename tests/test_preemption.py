"""A run stopped early (signal, wall-time limit) saves, exits 75 and resumes by itself, exactly;
under a real (localhost) Slurm cluster the CPU batch template requeues itself and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TINY_CONFIG, _free_port, slurm_job_state
from trainer_runs import _metrics, _overrides, _train, data_dir  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.slow

STEPS = 8


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Two data-parallel processes, no interruption: the losses every resumed run must repeat."""
    run = tmp_path_factory.mktemp("uninterrupted")
    _train(2, _overrides(data_dir, run, steps=STEPS))
    train, _ = _metrics(run)
    return [r["loss"] for r in train], [r["answer_tokens"] for r in train]


def _command(overrides, torchrun_options=()):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-port", str(_free_port()), *torchrun_options, str(ROOT / "pretrain_vlm.py"),
            "--config", str(TINY_CONFIG), "--set", *overrides]


def _resumed_losses_match(data_dir, run, uninterrupted, stopped_at):
    """Running the same command again resumes from the saved step and ends like the uninterrupted run."""
    stdout = _train(2, _overrides(data_dir, run, steps=STEPS))
    assert "checkpoint.resume = auto: resuming from" in stdout
    assert f"resumed from {run}/checkpoints/iter_{stopped_at:07d} at step {stopped_at}" in stdout
    train, _ = _metrics(run)  # metrics.jsonl is appended to: both parts of the run
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses, tokens = uninterrupted
    assert [r["answer_tokens"] for r in train] == tokens
    assert [r["loss"] for r in train] == losses


def test_sigusr1_through_torchrun_stops_both_ranks_at_one_step_and_resumes_exactly(data_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # torchrun passes the signal on to both training processes (the Slurm templates' setting).
    process = subprocess.Popen(
        _command(_overrides(data_dir, run, steps=STEPS), ["--signals_to_handle", "SIGTERM,SIGINT,SIGUSR1"]),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics_file = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics_file.exists() and sum('"loss"' in line for line in open(metrics_file)) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(signal.SIGUSR1)
    stdout, stderr = process.communicate(timeout=300)
    saved = open(run / "checkpoints" / "latest").read().strip()
    stopped_at = int(saved.split("_")[1])
    assert 2 <= stopped_at < STEPS, stdout[-2000:]
    assert f"stopped at step {stopped_at} of {STEPS}: SIGUSR1 received; exit status 75" in stdout, stdout[-2000:]
    assert f"checkpoint: {run}/checkpoints/{saved}" in stdout
    train, _ = _metrics(run)
    assert [r["step"] for r in train] == list(range(1, stopped_at + 1))
    _resumed_losses_match(data_dir, run, uninterrupted, stopped_at)


def test_background_saves_leave_training_unchanged_keep_last_prunes_and_resume_never_starts_afresh(
        data_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    # Interval saves at 2, 4 and 6 are written by helper processes while training goes on.
    _train(2, _overrides(data_dir, run, steps=STEPS, extra=["checkpoint.interval=2", "checkpoint.keep_last=2",
                                                            "checkpoint.keep_every=4", "checkpoint.async_save=true"]))
    # Saved at 2, 4, 6, 8: the newest two and every fourth remain, and nothing half written.
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000004", "iter_0000006", "iter_0000008", "latest"]
    assert open(run / "checkpoints" / "latest").read().strip() == "iter_0000008"
    train, _ = _metrics(run)
    assert [r["loss"] for r in train] == uninterrupted[0]
    # The background-written step 6 resumes exactly (its step-7 and step-8 losses are the uninterrupted ones).
    stdout = _train(2, _overrides(data_dir, run, steps=STEPS, extra=[f"checkpoint.load={run}/checkpoints/iter_0000006"]))
    assert "resumed from" in stdout and "at step 6" in stdout
    train, _ = _metrics(run)
    assert [r["loss"] for r in train[STEPS:]] == uninterrupted[0][6:]
    stdout = _train(2, _overrides(data_dir, run, steps=STEPS, extra=["checkpoint.resume=never"]))
    assert "resuming" not in stdout
    train, _ = _metrics(run)
    assert [r["loss"] for r in train[STEPS + 2:]] == uninterrupted[0]


def test_slurm_job_signalled_before_its_time_limit_requeues_itself_and_finishes_exactly(
        data_dir, tmp_path, uninterrupted, slurm):
    run, log = tmp_path / "run", tmp_path / "job.out"
    env = dict(slurm, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()),
               MEGAVL_EXIT_STATUS_FILE=str(tmp_path / "trainer.status"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={log}", f"--chdir={ROOT}", str(ROOT / "examples/slurm/pretrain_cpu.sbatch"),
         str(TINY_CONFIG), "--set", *_overrides(data_dir, run, steps=STEPS)],
        env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]

    metrics_file = run / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics_file.exists() and sum('"loss"' in line for line in open(metrics_file)) >= 2):
        assert time.monotonic() < deadline and slurm_job_state(job_id, env).get("JobState") in ("PENDING", "RUNNING"), (
            f"{slurm_job_state(job_id, env)}\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.05)
    # What Slurm sends before a time limit (--signal=USR1@...): to every process of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job_id], env=env, check=True, timeout=60)

    while (state := slurm_job_state(job_id, env)).get("JobState") != "COMPLETED":
        assert time.monotonic() < deadline, f"{state}\n{log.read_text()}"
        assert state.get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "CONFIGURING"), f"{state}\n{log.read_text()}"
        time.sleep(0.5)
    assert state["Restarts"] == "1"

    text = log.read_text()
    assert "SIGUSR1 received; exit status 75" in text
    assert f"requeueing job {job_id}" in text
    assert "checkpoint.resume = auto: resuming from" in text
    assert (tmp_path / "trainer.status").read_text().strip() == "0"
    train, _ = _metrics(run)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    losses, tokens = uninterrupted
    assert [r["answer_tokens"] for r in train] == tokens
    assert [r["loss"] for r in train] == losses


def test_wall_time_stop_with_randomness_in_play_exits_75_and_the_same_command_resumes_exactly(data_dir, tmp_path):
    """Dropout draws, loader worker processes and two data-parallel ranks; train.max_wall_time
    stops the run at step 1, which is not a checkpoint-interval step (interval 3), with exit
    status 75: running the same command again resumes and repeats every loss."""
    random = ["train.dropout=0.1", "data.num_workers=1"]
    reference = tmp_path / "reference"
    _train(2, _overrides(data_dir, reference, steps=5, extra=random))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stopped = subprocess.run(_command(_overrides(data_dir, run, steps=5, extra=[*random, "train.max_wall_time=0.001"])),
                             env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    # torchrun reports the workers' status 75 and exits non-zero itself.
    assert stopped.returncode != 0
    assert "exitcode  : 75" in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped at step 1 of 5: train.max_wall_time reached; exit status 75" in stopped.stdout, (
        stopped.stdout[-2000:] + stopped.stderr[-3000:])
    assert open(run / "checkpoints" / "latest").read().strip() == "iter_0000001"
    stdout = _train(2, _overrides(data_dir, run, steps=5, extra=random))
    assert "checkpoint.resume = auto: resuming from" in stdout
    assert f"resumed from {run}/checkpoints/iter_0000001 at step 1" in stdout
    expected, _ = _metrics(reference)
    resumed, _ = _metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in expected]
