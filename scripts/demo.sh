#!/usr/bin/env bash
# The README's first command: install into .venv, then generate the same prompts and seeds with SLD
# off / medium / strong on the shipped toy model, judged by the toy world's classifiers, and once more
# through every security layer (policy "toy": SLD + the toy classifier blurs what still shows the marker):
# demo-out/index.html, grid.png, summary.json, audit.sqlite3; then `safelatent eval` over baseline and the
# four SLD presets: demo-out/eval/report/index.html. No network, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"

bash scripts/install.sh
"$VENV/bin/safelatent" toy demo --out demo-out
# The measurement: baseline and the four SLD presets on 16 toy marker prompts, resumable, with a report.
"$VENV/bin/safelatent" eval --prompts toy-marker --limit 16 --sld off,weak,medium,strong,max \
    --images-per-prompt 2 --steps 25 --save-images --out demo-out/eval
echo "open demo-out/index.html and demo-out/eval/report/index.html"
