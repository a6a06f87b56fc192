#!/usr/bin/env bash
# The README's first command: install into .venv, then generate the same prompts and seeds with SLD
# off / medium / strong on the shipped toy model, judged by the toy world's classifiers, and once more
# through every security layer (policy "toy": SLD + the toy classifier blurs what still shows the marker):
# demo-out/index.html, grid.png, summary.json, audit.sqlite3. No network, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

bash scripts/install.sh
"$VENV/bin/safelatent" toy demo --out demo-out
echo "open demo-out/index.html"
