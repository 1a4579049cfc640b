"""megavl: Megatron-style pretraining of vision-language models, from one laptop CPU to GPU clusters."""

from setuptools import find_packages, setup

setup(
    name="megavl",
    version="0.1.0",
    description="Vision-language model pretraining on megatron-core (GPU and CPU back ends)",
    packages=find_packages(include=["megavl", "megavl.*"]),
    python_requires=">=3.10",
    install_requires=[
        # The CPU install path pins torch==2.13.0 first (see Makefile); GPU images bring their own.
        "torch>=2.6",
        # 0.16.1 is the newest release for Python 3.11; 0.17+ needs Python 3.12.
        "megatron-core>=0.16.1,<0.20",
        "transformers>=5.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tensorboard>=2.15",
        "numpy>=1.26",
        "pillow>=10.0",
        # dist_checkpointing's saver needs psutil.
        "psutil>=5.9",
        "einops>=0.7",
        "webdataset>=0.2.90",
        # Shard lists in energon's split.yaml are brace patterns (megavl/eval/items.py reads them).
        "braceexpand>=0.1.7",
        # The data loader: blending, DP/worker sharding, exact save/restore.
        "megatron-energon>=7.4,<8",
        "jinja2>=3.1",
        # metrics.png: loss and task accuracy over steps, written at the end of a run.
        "matplotlib>=3.8",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.40"],
        # train.optimizer: muon. On Python 3.11 the Makefile installs it past its Python >= 3.12 marker.
        "muon": ["emerging-optimizers>=0.3"],
        "gpu": ["transformer-engine[pytorch]>=2.4", "nvidia-dali-cuda120>=1.40", "emerging-optimizers>=0.3"],
        "dev": ["pytest>=8.0"],
        # make eval-lmms and its test: what lmms-eval's evaluator imports. lmms-eval itself is installed
        # without its declared dependencies (the Makefile), which pull torchvision and a CUDA torch.
        "lmms": ["accelerate>=1.0", "datasets>=3.0", "evaluate>=0.4", "loguru>=0.7", "sacrebleu>=2.0",
                 "pytz", "tenacity>=8.3"],
    },
)
