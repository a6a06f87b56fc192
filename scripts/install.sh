#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install safelatent into it, CPU torch first.
#
#   scripts/install.sh [EXTRAS]      e.g. scripts/install.sh test
#
#   VENV        virtual environment folder (default .venv)
#   TORCH_SPEC  torch requirement installed first (default torch==2.13.0, the CPU build on this
#               workplace's disk). Installing it first keeps pip's resolver from pulling a multi-GB
#               CUDA build to satisfy safelatent's "torch>=" later. Elsewhere choose your build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH_SPEC"
if [ -n "$EXTRAS" ]; then
    "${PIP[@]}" -e ".[$EXTRAS]"
else
    "${PIP[@]}" -e .
fi
# NudeNet (its ONNX model ships in the wheel) without its opencv-python-headless pin: see pyproject.toml.
"${PIP[@]}" --no-deps "nudenet==3.4.2"
