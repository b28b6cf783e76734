#!/usr/bin/env bash
# The main job: set up .venv if needed, then train FocalRetinaNet on the embedded demo data on
# CPU and print Detectron2's COCO box AP table. Extra arguments are passed to train_net.py,
# e.g. `bash scripts/demo.sh SOLVER.MAX_ITER 100 OUTPUT_DIR output/quick`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
exec .venv/bin/python train_net.py --config-file configs/demo.yaml "$@"
