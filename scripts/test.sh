#!/usr/bin/env bash
# The README's test command: create/refresh .venv, install everything from scratch, lint, run pytest.
# Fresh machine needs only Python 3.11, pip and gcc. CI (.ci/run) calls exactly this script.
#
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0: the CPU build on this
#                workplace's disk; elsewhere pick the build you want, e.g. from the CPU index).
#   VENV         virtual environment folder (default .venv).
#   PYTEST_ARGS  extra pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

# torch first, so no resolver pulls a multi-GB CUDA build to satisfy "torch>=..." later.
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[test]"
# open_clip's own tokenizer is the oracle of the tokenizer parity test. --no-deps: its torchvision
# dependency would replace the CPU torch build (and does not import beside it); the test loads only
# open_clip/tokenizer.py, which needs ftfy and regex (already installed as safelatent dependencies).
"${PIP[@]}" --no-deps "open-clip-torch==3.3.0"

"$VENV/bin/ruff" check src tests bench scripts
"$VENV/bin/ruff" format --check src tests bench scripts
# shellcheck disable=SC2086
"$PY" -m pytest -q ${PYTEST_ARGS:-}
