"""tools/gpu_selfcheck.py runs whole on a machine without a GPU: the checks that need none pass, the
others are skips that say why, and the table and the JSON agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_selfcheck_runs_as_a_cpu_smoke_test(tmp_path):
    out = tmp_path / "selfcheck.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_selfcheck.py"), "--json", str(out)],
                            env=dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    rows = {row["check"]: row for row in json.loads(out.read_text())["rows"]}
    assert {name: row["status"] for name, row in rows.items()} == {
        "platform": "skip", "nccl_world": "pass", "train_tiny": "pass", "train_1b": "skip", "flex_vs_sdpa": "pass",
        "te_fp8": "skip", "te_vision_lora": "skip", "dali_mixed": "skip", "cpu_checkpoint": "pass",
    }
    assert "backend gloo" in rows["nccl_world"]["detail"]
    assert "forward only" in rows["flex_vs_sdpa"]["detail"] and "d80" in rows["flex_vs_sdpa"]["detail"]
    assert "not implemented" in rows["te_vision_lora"]["detail"]
    for name, row in rows.items():
        assert f"{name}" in result.stdout and row["detail"][:40] in result.stdout
