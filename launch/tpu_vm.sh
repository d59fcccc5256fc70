#!/usr/bin/env bash
# A Cloud TPU slice from creation to deletion (recipe: launch/README.md). Each command runs
# gcloud on this machine; --dry-run prints every command instead of running it.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [gcloud flags]  # queued resource, e.g. v5litepod-16
#   launch/tpu_vm.sh wait NAME ZONE            # until the slice is ACTIVE (polls every 30 s)
#   launch/tpu_vm.sh copy NAME ZONE            # this checkout -> ~/mipo_jax on every worker
#   launch/tpu_vm.sh run NAME ZONE -- --config=configs/llama3_1b.py --workdir=...
#                                              # copy, then launch/run_tpu.sh on every worker
#   launch/tpu_vm.sh ssh NAME ZONE -- COMMAND  # any shell command on every worker at once
#   launch/tpu_vm.sh delete NAME ZONE
#   launch/tpu_vm.sh --dry-run run NAME ZONE -- ...   # print the commands, run nothing
#
# The runtime image follows the accelerator (v5litepod-*: v2-alpha-tpuv5-lite, v5p-*:
# v2-alpha-tpuv5, v6e-*: v2-alpha-tpuv6e, v4-*: tpu-ubuntu2204-base); RUNTIME overrides it.
# "copy" sends the files git would commit (tracked and untracked, not ignored: no .venv,
# no .git), so uncommitted edits travel too. The gcloud project is gcloud's current one
# (or CLOUDSDK_CORE_PROJECT). One slice only: multi-slice (DCN) training is out of scope.
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = --dry-run ]; then DRY_RUN=1; shift; fi
usage="usage: tpu_vm.sh [--dry-run] create|wait|copy|run|ssh|delete NAME ZONE ..."
cmd=${1:?$usage}; name=${2:?$usage}; zone=${3:?$usage}
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball="${TMPDIR:-/tmp}/mipo_jax-$name.tar.gz"

quote() {  # one word as a POSIX shell reads it back (plain when safe, else single-quoted)
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

x() {  # run a command, or print it (--dry-run)
  if [ "$DRY_RUN" = 1 ]; then
    local line="" word
    for word in "$@"; do line+=" $(quote "$word")"; done
    echo "${line# }"
  else
    "$@"
  fi
}

runtime_for() {
  case "$1" in
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "tpu_vm.sh: no default runtime for $1; set RUNTIME=<TPU software version>" >&2
       return 2 ;;
  esac
}

ssh_all() {  # NAME's every worker runs the shell command $1
  x gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$1"
}

copy() {  # the checkout as git sees it, packed here, unpacked into ~/mipo_jax everywhere
  if [ "$DRY_RUN" = 1 ]; then
    echo "git -C $(quote "$repo") ls-files -z --cached --others --exclude-standard |" \
      "tar -czf $(quote "$tarball") -C $(quote "$repo") --null -T -"
  else
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      tar -czf "$tarball" -C "$repo" --null -T -
  fi
  x gcloud compute tpus tpu-vm scp "$tarball" "$name:mipo_jax.tar.gz" --zone="$zone" --worker=all
  ssh_all "mkdir -p ~/mipo_jax && tar -xzf ~/mipo_jax.tar.gz -C ~/mipo_jax"
}

rest() {  # the arguments after an optional "--", quoted for the workers' shell
  if [ "${1:-}" = -- ]; then shift; fi
  if [ $# -gt 0 ]; then printf ' %q' "$@"; fi
}

case "$cmd" in
  create)
    accel=${1:?ACCELERATOR, e.g. v5litepod-16 or v5p-32}
    shift
    runtime=${RUNTIME:-}
    if [ -z "$runtime" ]; then runtime=$(runtime_for "$accel"); fi
    x gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
      --accelerator-type="$accel" --runtime-version="$runtime" "$@"
    ;;
  wait)
    describe=(gcloud compute tpus queued-resources describe "$name" --zone="$zone"
      --format=value\(state.state\))
    if [ "$DRY_RUN" = 1 ]; then x "${describe[@]}"; exit 0; fi
    while true; do
      state=$("${describe[@]}")
      echo "$(date +%T) $name: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) exit 1 ;;
      esac
      sleep 30
    done
    ;;
  copy) copy ;;
  run)
    args=$(rest "$@")
    copy
    ssh_all "cd ~/mipo_jax && bash launch/run_tpu.sh$args"
    ;;
  ssh)
    if [ "${1:-}" = -- ]; then shift; fi
    ssh_all "${*:?COMMAND}"
    ;;
  delete)
    x gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    ;;
  *) echo "tpu_vm.sh: unknown command $cmd; $usage" >&2; exit 2 ;;
esac
