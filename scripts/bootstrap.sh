#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $VENV (default .venv) with everything the tests,
# the benchmarks and the frontier use, and builds the C++ extension in place (editable install).
#
# torch is pinned to 2.13.0 here, whose CPU build this project's machines have on disk; an
# unpinned torch would pull a multi-GB CUDA build. The package itself only asks torch>=2.3.
# kronfluence goes in with --no-deps: it declares torchvision (and through it a CUDA torch) but
# never imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[test,triton,hf]"
# The [bench] extra of pyproject.toml without kronfluence's torchvision: keep the two lists in step.
pip install -q traker dattri matplotlib accelerate einops einconv opt-einsum
pip install -q --no-deps kronfluence
python -m attrkernels info
