# GPU image: NGC PyTorch (Python 3.12, CUDA, NCCL, Transformer Engine, apex) plus megavl and DALI.
#   docker build -t megavl .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data megavl \
#     torchrun --nproc-per-node 8 pretrain_vlm.py --config examples/configs/moe_8b_a1b.yaml
# Slurm with enroot/pyxis (the templates in examples/slurm/):
#   enroot import -o megavl.sqsh dockerd://megavl
#   #SBATCH --container-image=megavl.sqsh --container-mounts=/data:/data
# Nothing is downloaded from a model hub at build or run time: checkpoints and tokenizers are
# local folders (tools/convert_from_hf.py takes a path).
FROM nvcr.io/nvidia/pytorch:25.09-py3

# base image provides: torch, transformer-engine, apex
# The base image pins its torch and TE (PIP_CONSTRAINT); megavl installs around them.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 1000 megavl
WORKDIR /workspace/megavl
COPY --chown=megavl:megavl setup.py README.md ./
COPY --chown=megavl:megavl megavl ./megavl
RUN pip install --no-cache-dir -e ".[dali,muon]" \
    && python -c "import megavl, megatron.core, nvidia.dali, transformer_engine.pytorch, emerging_optimizers"
COPY --chown=megavl:megavl . .
USER megavl
