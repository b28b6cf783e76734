#!/usr/bin/env bash
# The tests: set up .venv if needed, check formatting, then run the whole pytest suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
BIN=.venv/bin
SOURCES=(focal_det2 tests benchmarks train_net.py setup.py)
"$BIN/black" --check --quiet "${SOURCES[@]}"
"$BIN/isort" --check-only --quiet "${SOURCES[@]}"
"$BIN/flake8" "${SOURCES[@]}"
exec "$BIN/python" -m pytest "$@"
