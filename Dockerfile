# GPU image: NGC PyTorch (Python 3.12, CUDA, Transformer Engine, apex) plus megavl.
# Build: docker build -t megavl .   Run: see examples/slurm/.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /workspace/megavl
COPY setup.py README.md ./
COPY megavl ./megavl
# torch and Transformer Engine come with the base image; DALI is added for GPU decode.
RUN pip install --no-cache-dir -e ".[dali]" && python -c "import megavl, megatron.core"
COPY . .
