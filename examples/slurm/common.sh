# Shared by the batch templates; sourced from the repository root, where sbatch is run.

# megavl_run_and_requeue COMMAND...: runs the training step, then requeues this job when the
# trainer stopped early with a checkpoint (a signal before the time limit, a preemption, or
# train.max_wall_time). torchrun has a status of its own, so the trainer's is read from the
# file MEGAVL_EXIT_STATUS_FILE names: 75 = stopped early and saved; 0 = finished.
megavl_run_and_requeue() {
  export MEGAVL_EXIT_STATUS_FILE="${MEGAVL_EXIT_STATUS_FILE:-logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.status}"
  mkdir -p "$(dirname "$MEGAVL_EXIT_STATUS_FILE")"
  rm -f "$MEGAVL_EXIT_STATUS_FILE"
  echo "megavl: job $SLURM_JOB_ID start ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST: $*"
  set +e
  "$@"
  local status=$?
  set -e
  local trainer
  trainer=$(cat "$MEGAVL_EXIT_STATUS_FILE" 2>/dev/null || echo none)
  if [ "$trainer" = 75 ]; then
    echo "megavl: the trainer stopped early with a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "megavl: step exit status $status, trainer status $trainer"
  [ "$trainer" = 0 ] && exit 0
  exit "$status"
}

# megavl_train PROCESSES_PER_NODE CONFIG [--set key=value ...]: checks the config for the job's
# world size with --dry-run (seconds, before any GPU time is spent), then runs one torchrun per
# node under srun, rendezvousing (c10d) on the job's first node, and requeues when stopped early.
megavl_train() {
  local per_node=$1 config=$2
  shift 2
  local master_addr
  master_addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  python pretrain_vlm.py --config "$config" --dry-run --world-size "$((SLURM_NNODES * per_node))" "$@" > /dev/null
  # torchrun passes SIGTERM and SIGUSR1 on to the training processes and waits up to
  # --shutdown_timeout seconds for their checkpoint before it kills them.
  megavl_run_and_requeue srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes "$SLURM_NNODES" --nproc-per-node "$per_node" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$master_addr:${MASTER_PORT:-29500}" \
    --signals_to_handle SIGTERM,SIGINT,SIGUSR1 --shutdown_timeout "${MEGAVL_SHUTDOWN_TIMEOUT:-280}" \
    pretrain_vlm.py --config "$config" "$@"
}

# NCCL and CUDA settings of the GPU templates, one knob a line.
megavl_gpu_environment() {
  export CUDA_DEVICE_MAX_CONNECTIONS=1       # lets megatron overlap TP communication with compute
  export NCCL_IB_TIMEOUT=22                  # InfiniBand retry timeout (4.096 us * 2^22): rides out fabric hiccups
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed collective ends the job instead of hanging it
}
