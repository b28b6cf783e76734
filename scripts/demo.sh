#!/usr/bin/env bash
# The main job: set up .venv if needed, then train FocalRetinaNet on the embedded demo data on
# CPU, print Detectron2's COCO box AP table and where the training report is. Extra arguments
# are passed to train_net.py, e.g. `bash scripts/demo.sh SOLVER.MAX_ITER 100 OUTPUT_DIR
# output/quick`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
.venv/bin/python train_net.py --config-file configs/demo.yaml "$@"
# The run's OUTPUT_DIR: the last one given on the command line, else the config's.
output_dir=output/demo
args=("$@")
for ((i = 0; i + 1 < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == OUTPUT_DIR ]]; then
        output_dir="${args[i + 1]}"
    fi
done
echo "Training report (curves, per-class AP, PR curves, validation detections): $output_dir/report/"
