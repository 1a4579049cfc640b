"""Shared fixtures: a one-process megatron world for in-process tests, a torchrun launcher, and the
DALI requirement (MEGAVL_REQUIRE_DALI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
# The tiny config evaluates task accuracy, which generation cannot run under pipeline or
# sequence parallelism; tests of those layouts switch it off.
NO_TASK_EVAL = "train.task_eval.interval=null"
WORKERS = Path(__file__).resolve().parent / "workers"
# Order gives <|image_pad|> id 3, the default model.lm.image_token_id.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
    "<|box_start|>", "<|box_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
]


# Set by `make test`, which installs megavl[dali]: there a missing DALI fails the DALI tests
# instead of skipping them, so CI cannot pass without ever running them.
REQUIRE_DALI = "MEGAVL_REQUIRE_DALI"


def dali_required() -> bool:
    return os.environ.get(REQUIRE_DALI, "").strip().lower() not in ("", "0", "false", "no")


def import_dali_or_skip():
    """The nvidia.dali module; without it a skip, or a failure when MEGAVL_REQUIRE_DALI is set."""
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401  (the operators the back end uses)

        return nvidia.dali
    except ImportError as e:
        missing = str(e)
    if dali_required():
        pytest.fail(
            f"{REQUIRE_DALI}={os.environ[REQUIRE_DALI]} but NVIDIA DALI cannot be imported ({missing}); "
            "install it with: pip install 'megavl[dali]', or unset the variable to skip the DALI tests",
            pytrace=False,
        )
    pytest.skip(f"NVIDIA DALI is not installed ({missing}); set {REQUIRE_DALI}=1 to make this a failure")


def tiny_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE trained in milliseconds on corpus, with megavl's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def megatron_world():
    """Initialises a single-process gloo world and megatron's parallel state once per session."""
    from megavl.config import load_config
    from megavl.platform.distributed import init_distributed, set_seed

    config = load_config(str(TINY_CONFIG))
    init_distributed(config)
    set_seed(config.train.seed)
    yield config


def run_torchrun(nproc: int, script: str, args: list[str], timeout: int = 300) -> None:
    """Runs a worker under torchrun on the CPU and fails the test with its output if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--master-port", str(_free_port()),
        str(WORKERS / script), *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on localhost (tools/slurm_localhost.sh); the environment to reach it."""
    where = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "tools" / "slurm_localhost.sh")
    result = subprocess.run(["bash", script, "start", str(where), str(_free_port()), str(_free_port())],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"the localhost Slurm cluster did not start:\n{result.stdout}\n{result.stderr}")
    yield dict(os.environ, SLURM_CONF=str(where / "slurm.conf"))
    subprocess.run(["bash", script, "stop", str(where)], timeout=60)


def slurm_job_state(job_id: str, env: dict) -> dict:
    """JobState, Restarts, Reason and ExitCode of a job, as scontrol shows them."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    state = dict(re.findall(r"(JobState|Restarts|Reason|ExitCode)=(\S+)", shown.stdout))
    # A pending job waits for these; any other reason (e.g. PartitionConfig) means it never runs.
    assert state.get("JobState") != "PENDING" or state.get("Reason") in ("None", "Priority", "Resources", "BeginTime"), (
        shown.stdout)
    return state
