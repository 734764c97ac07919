# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced in the batch shell, not run). Sets the rendezvous and
# communication environment and defines `pwdpo_launch`, which runs one task per GPU with
# srun, forwards the stop signal to it and requeues the job when the run asks for it.
# Every variable below can be set before `sbatch` (sbatch exports the environment).

# --- Which Python runs the package (a venv's python, or the container's) --------------
PWDPO_PYTHON=${PWDPO_PYTHON:-python3}

# --- Rendezvous: every task reads its rank from Slurm (SLURM_PROCID, SLURM_NTASKS,
# SLURM_LOCALID); rank 0's host and a port derived from the job id (the same after a
# requeue, in 20000-29999, below Linux's ephemeral ports 32768+) are the meeting point.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
export MASTER_ADDR MASTER_PORT
# torchrun's variables win over Slurm's in megatron_pwdpo.platform.distributed: never inherit them.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK

# --- The job's end, in epoch seconds: the run stops at the last step boundary from
# which a step and a checkpoint still fit before it (from the step and save times it
# measured; see megatron_pwdpo/platform/resilience.py). Slurm >= 23.02 sets SLURM_JOB_END_TIME;
# older ones are asked with squeue (empty for a job without a time limit).
if [ -z "${PWDPO_JOB_END_TIME:-}" ]; then
  if [ -n "${SLURM_JOB_END_TIME:-}" ]; then
    PWDPO_JOB_END_TIME=$SLURM_JOB_END_TIME
  else
    PWDPO_JOB_END_TIME=$(date -d "$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)" +%s 2>/dev/null || true)
  fi
fi
export PWDPO_JOB_END_TIME

# --- Communication: NCCL over NVLink within a node, InfiniBand/RoCE across nodes -------
export CUDA_DEVICE_MAX_CONNECTIONS=1       # Megatron: TP/SP collectives stay ordered with compute
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a failed or timed-out collective ends the process
export TORCH_NCCL_AVOID_RECORD_STREAMS=1   # frees collective buffers sooner (less memory)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}      # INFO on a new cluster: logs the transports NCCL chose
# Site-specific: uncomment and adapt (ask the admins, or read an existing NCCL job script).
# export NCCL_SOCKET_IFNAME=ib0            # interface for NCCL's bootstrap/TCP traffic
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_6,mlx5_7,mlx5_8,mlx5_9  # compute HCAs only
# export NCCL_IB_GID_INDEX=3               # RoCE: the GID of the RoCEv2 address
# export NCCL_NVLS_ENABLE=0                # no NVLink SHARP (if the fabric manager lacks it)
# UCX is read only by clusters whose NCCL uses the HPC-X/SHARP plugin or whose srun uses PMIx:
# export UCX_NET_DEVICES=mlx5_0:1          # the HCA for UCX traffic
# export UCX_TLS=rc,sm,self                # reliable connected + shared memory transports
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one CPU thread per rank for torch's CPU ops
export PYTHONUNBUFFERED=1                  # log lines reach the job's output as they happen

# --- Optional container (pyxis + enroot): an image with megatron-pwdpo installed -------
# e.g. PWDPO_CONTAINER_IMAGE=/shared/images/pwdpo.sqsh PWDPO_CONTAINER_MOUNTS=/lustre:/lustre
PWDPO_SRUN_CONTAINER=()
if [ -n "${PWDPO_CONTAINER_IMAGE:-}" ]; then
  PWDPO_SRUN_CONTAINER=(
    --container-image="$PWDPO_CONTAINER_IMAGE"
    --container-mounts="${PWDPO_CONTAINER_MOUNTS:-$PWD:$PWD}"
    --container-workdir="$PWD"
  )
fi

# --- Stop signals. Before the time limit Slurm sends USR1 to this shell only
# (#SBATCH --signal=B:USR1@SECS): it goes on to srun, which forwards it to every task; the
# tasks save a checkpoint at the next step boundary, rank 0 writes $PWDPO_REQUEUE_FILE
# and every task exits 0. scancel and preemption send TERM to every process of the job
# themselves; it is only noted here (never passed to srun, which answers TERM by killing
# the step).
PWDPO_STOP=""
PWDPO_TRAPPED=0
PWDPO_STEP_PID=""
pwdpo_on_signal() {
  PWDPO_STOP=$1
  PWDPO_TRAPPED=1
  echo "pwdpo: $(date +%T) got SIG$1" >&2
  if [ "$1" = USR1 ] && [ -n "$PWDPO_STEP_PID" ]; then
    echo "pwdpo: forwarding SIGUSR1 to the tasks" >&2
    kill -USR1 "$PWDPO_STEP_PID" 2>/dev/null
  fi
}
trap 'pwdpo_on_signal USR1' USR1
trap 'pwdpo_on_signal TERM' TERM

# Requeue at most this many times (SLURM_RESTART_COUNT counts them): a run that can never
# finish does not loop forever.
PWDPO_MAX_REQUEUES=${PWDPO_MAX_REQUEUES:-50}

# How a run asks for a requeue: rank 0 creates this file after its checkpoint and every
# rank exits 0 (an exit code cannot carry it: with --kill-on-bad-exit the first rank to
# exit 75 would get the others killed). In the job's working directory (shared by the
# nodes), one per job id, so a requeued job never reads its own earlier request.
export PWDPO_REQUEUE_FILE=${PWDPO_REQUEUE_FILE:-$PWD/.pwdpo-requeue-$SLURM_JOB_ID}

# pwdpo_launch ARGS...: `srun` one task per allocated task slot running
# `$PWDPO_PYTHON -m megatron_pwdpo.cli ARGS`; returns its exit code. When the run left
# $PWDPO_REQUEUE_FILE (it saved a checkpoint and asks to be run again) the job is
# requeued, unless the stop came from scancel/preemption (TERM): Slurm itself requeues a
# preempted --requeue job.
pwdpo_launch() {
  echo "pwdpo: $(date +%T) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on" \
       "$SLURM_JOB_NODELIST: $SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
  rm -f "$PWDPO_REQUEUE_FILE"
  # --kill-on-bad-exit=1: the first task to exit non-zero (an exception, a lost GPU, a
  # refused run_dir lock) gets the whole step killed at once, instead of the others
  # waiting for their next collective to time out while the allocation idles.
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
       "${PWDPO_SRUN_CONTAINER[@]}" "$PWDPO_PYTHON" -m megatron_pwdpo.cli "$@" &
  PWDPO_STEP_PID=$!
  local status last=""
  while :; do   # `wait` returns early (128+n) when a trapped signal arrives: wait again
    PWDPO_TRAPPED=0
    wait "$PWDPO_STEP_PID"
    status=$?
    if [ "$status" = 127 ] && [ -n "$last" ]; then status=$last; break; fi
    if [ "$PWDPO_TRAPPED" = 1 ] && [ "$status" -gt 128 ]; then last=$status; continue; fi
    break
  done
  PWDPO_STEP_PID=""
  if [ "$status" = 0 ] && [ -f "$PWDPO_REQUEUE_FILE" ] && [ "$PWDPO_STOP" != TERM ]; then
    rm -f "$PWDPO_REQUEUE_FILE"
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$PWDPO_MAX_REQUEUES" ]; then
      echo "pwdpo: $(date +%T) the run saved a checkpoint and asked for a requeue: requeueing" >&2
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "pwdpo: a requeue was asked but the job was requeued $PWDPO_MAX_REQUEUES times: not again" >&2
    fi
  fi
  rm -f "$PWDPO_REQUEUE_FILE"
  return "$status"
}
