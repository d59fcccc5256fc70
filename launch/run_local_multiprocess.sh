#!/usr/bin/env bash
# Two (or N) JAX processes on this machine, 127.0.0.1, each with D simulated CPU devices:
# the same multi-host code path as a pod, for testing. Extra arguments go to mipo_jax.main.
#
#   N=2 D=2 bash launch/run_local_multiprocess.sh --config=configs/dpo.py:tiny --workdir=/tmp/mp
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2}; D=${D:-2}; PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
  MIPO_COORDINATOR="127.0.0.1:$PORT" MIPO_NUM_PROCESSES="$N" MIPO_PROCESS_ID="$i" \
    .venv/bin/python -m mipo_jax.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
