#!/usr/bin/env bash
# The whole test suite, from a fresh clone: venv + install, then pytest (SLURM tests install and
# start their own daemons; they skip only where the host forbids network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # venv, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
