#!/usr/bin/env bash
# Launch training: one process on a CPU or a single GPU; torchrun with one process per GPU when there are
# several (or with --nproc_per_node N). Every other flag goes to GradDotProd_LM.train (./train.sh -h).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the packages, without installing
if [[ -z "${GRADDOTPROD_CONFIG_FILE:-}" && -f "$repo/config_file.py" ]]; then
  export GRADDOTPROD_CONFIG_FILE="$repo/config_file.py"  # this repository's settings, from any directory
fi
python="${PYTHON:-python}"

nproc=""
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc_per_node|--nproc-per-node)
      [[ $# -ge 2 ]] || { echo "train.sh: error: --nproc_per_node needs a value" >&2; exit 2; }
      nproc="$2"; shift 2 ;;
    --nproc_per_node=*|--nproc-per-node=*) nproc="${1#*=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ -n "$nproc" && ! "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "train.sh: error: --nproc_per_node must be a positive integer, got '$nproc'" >&2
  exit 2
fi
if [[ -z "$nproc" ]]; then
  nproc=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
fi

if [[ "$nproc" -gt 1 ]]; then
  # check the flags once here: a bad flag exits 2 before any worker starts
  WORLD_SIZE="$nproc" "$python" -m GradDotProd_LM.args "${args[@]+"${args[@]}"}"
  for a in "${args[@]+"${args[@]}"}"; do [[ "$a" == "-h" || "$a" == "--help" ]] && exit 0; done
  exec torchrun --standalone --nproc_per_node "$nproc" -m GradDotProd_LM.train "${args[@]+"${args[@]}"}"
fi
exec "$python" -m GradDotProd_LM.train "${args[@]+"${args[@]}"}"
