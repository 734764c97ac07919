#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py holds the logic; --help for options):
#
#   bash bench/gpu_check.sh --out "$OUT"          # on a lent GPU, wheels from .whl
#   bash bench/gpu_check.sh --dry-run --out DIR   # everything but CUDA, on the CPU
#
# Writes DIR/summary.json, DIR/summary.md and DIR/check.log; exit 0 when every part
# passed. PYTHON overrides the interpreter (default python3: on the lent machine, the
# one holding torch).
set -uo pipefail
cd "$(dirname "$0")/.."
exec env PYTHONUNBUFFERED=1 "${PYTHON:-python3}" bench/gpu_check.py "$@"
