"""The batch templates in examples/slurm: well-formed, preemption-safe, and (the CPU ones) run on a
real localhost Slurm cluster. The preemption round trip itself is in test_preemption.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, _free_port, slurm_job_state

TEMPLATES = ROOT / "examples" / "slurm"
TRAINING = ["pretrain_vlm.sbatch", "finetune.sbatch", "pretrain_cpu.sbatch"]


@pytest.mark.parametrize("name", sorted(p.name for p in TEMPLATES.iterdir()))
def test_every_template_is_valid_bash(name):
    result = subprocess.run(["bash", "-n", str(TEMPLATES / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", TRAINING)
def test_training_templates_are_preemption_safe(name):
    text = (TEMPLATES / name).read_text()
    for line in ("#SBATCH --signal=USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append", "set -euo pipefail",
                 "source examples/slurm/common.sh", 'megavl_train '):
        assert line in text, f"{name} lacks {line!r}"
    common = (TEMPLATES / "common.sh").read_text()
    for part in ("--dry-run", "--rdzv-backend c10d", "--signals_to_handle SIGTERM,SIGINT,SIGUSR1",
                 "scontrol requeue", "MEGAVL_EXIT_STATUS_FILE"):
        assert part in common


def _wait(job_id, env, timeout=600) -> dict:
    deadline = time.monotonic() + timeout
    while (state := slurm_job_state(job_id, env)).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    return state


def _submit(env, tmp_path, *args) -> tuple[str, Path]:
    log = tmp_path / "job.out"
    submitted = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--chdir={ROOT}", *args],
                               env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0], log


@pytest.mark.slow
def test_conversion_template_imports_and_verifies_on_the_cluster(slurm, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from workers.convert_tiny_models import save_tiny_model

    save_tiny_model("qwen2_5_vl", str(tmp_path / "hf"))
    # A port of its own: this test process may already hold MASTER_PORT for its in-process world.
    env = dict(slurm, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    job_id, log = _submit(env, tmp_path, "--cpus-per-task=1", str(TEMPLATES / "convert.sbatch"), "from_hf",
                          "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"))
    state = _wait(job_id, env)
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{log.read_text()}"
    assert (tmp_path / "ckpt" / "megavl_config.yaml").is_file()
    assert "verif" in log.read_text().lower()

    job_id, log = _submit(env, tmp_path, "--cpus-per-task=1", str(TEMPLATES / "convert.sbatch"), "sideways")
    state = _wait(job_id, env)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0"
    assert "direction 'sideways' is not one of from_hf, to_hf" in log.read_text()
