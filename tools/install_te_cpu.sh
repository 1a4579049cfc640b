#!/usr/bin/env bash
# Builds a virtual environment with Transformer Engine's PyTorch extension on a machine without a
# GPU, for `make test-te` (tests/te: TE layers built on the CPU against megatron-core's local ones).
#
#   bash tools/install_te_cpu.sh [VENV]      (default .venv-te; about 6.7 GB, ~20 min on 2 cores)
#
# TE has no prebuilt transformer_engine_torch wheel it can reach from here, so the extension is
# compiled from PyPI's source release against the CUDA headers and libraries that PyPI's nvidia-*
# wheels carry (the CUDA build of torch pulls most of them; cuda-toolkit[nvcc,cccl] adds nvcc's
# crt headers and libcu++). The build is plain C++: nvcc is only asked for its version.
set -euo pipefail

VENV=${1:-.venv-te}
PY=$VENV/bin/python
TE_VERSION=2.20.2

python3 -m venv "$VENV"
"$PY" -m pip install --quiet --upgrade pip wheel setuptools packaging ninja pybind11
"$PY" -m pip install --quiet torch==2.14.1 numpy
"$PY" -m pip install --quiet "transformer_engine==$TE_VERSION" "transformer_engine_cu13==$TE_VERSION" \
    einops onnxscript onnx pydantic nvdlfw-inspect "nvidia-cudnn-frontend>=1.29.0" "cuda-toolkit[nvcc,cccl]==13.0.3.0"

# pip download would build the source release's metadata in an isolated environment, which cannot
# resolve the CUDA torch; the release is fetched from PyPI's simple index instead, and its sha256
# (from the index's link) checked.
SDIST_DIR=$(mktemp -d)
"$PY" - "$TE_VERSION" "$SDIST_DIR" <<'PYTHON'
import hashlib, re, sys, urllib.parse, urllib.request
version, folder = sys.argv[1], sys.argv[2]
index = "https://pypi.org/simple/transformer-engine-torch/"
page = urllib.request.urlopen(index).read().decode()
name = f"transformer_engine_torch-{version}.tar.gz"
links = [href for href in re.findall(r'href="([^"]+)"', page) if name in href]
if not links:
    sys.exit(f"{index} lists no {name}")
url, _, fragment = urllib.parse.urljoin(index, links[0]).partition("#sha256=")
data = urllib.request.urlopen(url).read()
if fragment and hashlib.sha256(data).hexdigest() != fragment:
    sys.exit(f"{name}: sha256 does not match the index's")
open(f"{folder}/{name}", "wb").write(data)
PYTHON

SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
MAX_JOBS=2 NVTE_BUILD_MAX_JOBS=2 NVTE_BUILD_THREADS_PER_JOB=1 NVTE_PYTORCH_FORCE_BUILD=TRUE \
NVTE_BUILD_USE_NVIDIA_WHEELS=1 NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 CUDA_HOME="$SP/nvidia/cu13" \
CPATH="$SP/nvidia/cu13/include:$SP/nvidia/nccl/include:$SP/nvidia/cudnn/include" \
LIBRARY_PATH="$SP/nvidia/cu13/lib:$SP/nvidia/nccl/lib:$SP/nvidia/cudnn/lib" \
    "$PY" -m pip install --quiet --no-build-isolation --no-deps "$SDIST_DIR"/transformer_engine_torch-*.tar.gz
rm -rf "$SDIST_DIR"

# megavl and what its tests import; torch is already the CUDA build, so pip keeps it.
"$PY" -m pip install --quiet -e ".[dev]"
# torch first: it loads the nvidia-* libraries (NCCL among them) that TE's core library links to.
"$PY" -c "import torch, transformer_engine.pytorch, megatron.core; print('Transformer Engine', transformer_engine.__version__)"
