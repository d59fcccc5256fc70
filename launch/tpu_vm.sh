#!/usr/bin/env bash
# Create a TPU VM slice with queued resources, copy the repository, and run on every worker.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR      # e.g. v5litepod-16
#   launch/tpu_vm.sh run NAME ZONE -- --config=configs/dpo.py --workdir=gs://BUCKET/dpo/run1
#   launch/tpu_vm.sh delete NAME ZONE
set -euo pipefail
cmd=${1:?create|run|delete}; name=${2:?NAME}; zone=${3:?ZONE}
case "$cmd" in
  create)
    accel=${4:?ACCELERATOR}
    gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
      --accelerator-type="$accel" --runtime-version="${RUNTIME:-v2-alpha-tpuv5-lite}"
    ;;
  run)
    shift 3; [ "${1:-}" = "--" ] && shift
    repo=$(cd "$(dirname "$0")/.." && pwd)
    gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all \
      "$repo" "$name":~/mipo_jax --exclude=.venv 2>/dev/null ||
      gcloud compute tpus tpu-vm scp --recurse --zone="$zone" --worker=all "$repo" "$name":~/mipo_jax
    gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
      --command="cd ~/mipo_jax && bash launch/run_tpu.sh $(printf '%q ' "$@")"
    ;;
  delete)
    gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    ;;
  *) echo "unknown command $cmd (create|run|delete)" >&2; exit 2 ;;
esac
