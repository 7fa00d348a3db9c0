#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): about 5 minutes on one GPU, one JSON file.
#   bash benchmarks/gpu_check.sh [--out FILE] [--jpeg DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" benchmarks/gpu_check.py "$@"
