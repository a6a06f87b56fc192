#!/usr/bin/env bash
# The README's test command: install everything from scratch into .venv, lint, run pytest.
# A fresh machine needs only Python 3.11, pip and gcc. CI (.ci/run) calls exactly this script.
#   VENV, TORCH_SPEC: see scripts/install.sh.   PYTEST_ARGS: extra pytest arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

bash scripts/install.sh test
# The web page's browser test drives Debian's Chromium (Playwright never downloads a browser here).
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# open_clip's own tokenizer is the oracle of the tokenizer parity test. --no-deps: its torchvision
# dependency would replace the CPU torch build (and does not import beside it); the test loads only
# open_clip/tokenizer.py, which needs ftfy and regex (already safelatent dependencies).
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "open-clip-torch==3.3.0"

"$VENV/bin/ruff" check src tests bench scripts
"$VENV/bin/ruff" format --check src tests bench scripts
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q --durations=15 ${PYTEST_ARGS:-}
