#!/usr/bin/env bash
# The first GPU check (docs/gpu.md): on a machine with a CUDA GPU, in under 10 minutes, the CUDA-relevant
# tests, a small `--stage all` and `--stage e2e` against `--plan`, benchmarks/memory.py --quick and
# --budget-mb 64, and 2 NCCL ranks where 2 GPUs exist; every figure in OUT/gpu_check.json.
#
#     scripts/gpu_check.sh OUT              # stops at once, exit status 2, when no GPU is visible
#     scripts/gpu_check.sh OUT --rehearse   # the same steps on the CPU at toy sizes (checks the script)
#
# Run it from the project's environment (pip install -e ".[test]"); PYTHON names another interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-$(command -v python || command -v python3)}" scripts/gpu_check.py "$@"
