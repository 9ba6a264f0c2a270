#!/usr/bin/env bash
# The GPU check (src/tmd/gpu_check.py): latency, stage-2 step memory and a 1-GPU FSDP2 smoke run, at most
# 10 minutes on one H200; writes gpu_check.json and gpu_check.md. --tiny runs the same on the CPU.
#   benchmarks/gpu_check.sh [--tiny] [--out DIR] [--budget-s SECONDS] [--device DEVICE]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m tmd.programs.gpu_check "$@"
