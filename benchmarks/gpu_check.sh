#!/usr/bin/env bash
# One prepared run for a lent GPU machine: build, check every GPU kernel against the reference,
# time it against the peers, and leave the results in $OUT (or benchmarks/results/gpu/).
#
#   bash benchmarks/gpu_check.sh            # about 5 minutes on an H100/H200
#
# Steps: install (CUDA torch from the machine, CuPy, Triton), `attrkernels info`, the GPU tests
# (tests/test_sketch.py runs the cuda and triton backends against the torch reference on the
# GPU, with the self-check on first use), then benchmarks.sketch --device cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

log "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo 'no nvidia-smi')"
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q torch
pip install -q -e ".[test,triton,cuda]" 2>&1 | tail -3
pip install -q traker dattri 2>&1 | tail -1 || true
python -m attrkernels info | tee "$OUT/info.txt"

log "GPU tests"
python -m pytest -q tests/test_sketch.py tests/test_philox.py -k "gpu or triton or cuda or known" 2>&1 | tee "$OUT/tests.txt" | tail -5

log "sketch benchmark"
python -m benchmarks.sketch --device cuda --reps 5 2>&1 | tail -40 | tee "$OUT/sketch_cuda.txt"
cp benchmarks/results/sketch_cuda.* "$OUT/" 2>/dev/null || true
log "done"
