#!/usr/bin/env bash
# The GPU check in one call, offline (see benchmarks/gpu_check.py for the steps):
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine: at most 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere (CI): the GPU steps on tiny CPU inputs
#
# Nothing is downloaded. The interpreter is $PYTHON if set; else, for the GPU run, the first of
# python3, python, .venv/bin/python whose torch sees a CUDA GPU (a lent machine's python3 has
# torch, Triton, CuPy and pybind11); for the dry run, .venv/bin/python if present, else python3.
# Results go to benchmarks/results/gpu/ (or --out DIR); when $OUT is set (the device tool's
# return folder), summary.md, summary.json and gpu_results.tar.gz are also copied there after
# every step. Carried peer wheels in benchmarks/gpu/wheels/ (scripts/gpu_wheels.sh) are installed
# with pip --no-index --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done

sees_gpu() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }

py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ "$dry" = 1 ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
  else
    for cand in python3 python .venv/bin/python; do
      if command -v "$cand" >/dev/null 2>&1 && sees_gpu "$cand"; then py=$cand; break; fi
    done
    if [ -z "$py" ]; then
      echo "no interpreter here has a torch that sees a CUDA GPU (tried python3, python, .venv/bin/python)." >&2
      echo "On a machine without a GPU: bash benchmarks/gpu_check.sh --dry-run" >&2
      exit 2
    fi
  fi
fi

pack=()
if [ -n "${OUT:-}" ]; then pack=(--pack "$OUT"); fi
export PYTHONUNBUFFERED=1
exec "$py" -m benchmarks.gpu_check ${pack[@]+"${pack[@]}"} "$@"
