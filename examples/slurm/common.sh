# Shared by the batch templates (sourced from the repository root, where sbatch is run).
#
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
