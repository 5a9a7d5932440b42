#!/usr/bin/env bash
# Downloads the peer wheels that a lent GPU machine lacks into benchmarks/gpu/wheels/ (git-ignored),
# for the GPU check to install offline (pip install --no-index --no-deps). Run it here, with
# network, before the device call, and name benchmarks/gpu/wheels in that call's `carry`.
#
# The machine's image already has torch, triton, cupy, numpy, scipy, transformers, accelerate,
# einops, opt-einsum, safetensors, tqdm, pyyaml, requests and scikit-learn (its package list:
# /work/.library/device/KINDS.md). Missing there, and used by the check: kronfluence (EK-FAC
# peer) and its einconv, traker and dattri (sketch peers in benchmarks.sketch). All are pure
# Python wheels (py3-none-any): one download serves any interpreter. Versions: those of
# scripts/bootstrap.sh's environment, so that the dry run here exercises the same APIs.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/gpu/wheels
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
# pip wheel: downloads a wheel where one is published, else builds one from the sdist (traker
# publishes only an sdist); every one of these builds a pure-Python py3-none-any wheel.
"$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$DEST" \
  "kronfluence==1.0.1" "einconv==0.1.0" "traker==0.3.2" "dattri==0.3.0"
ls -l "$DEST"
du -sh "$DEST"
