#!/usr/bin/env bash
# The whole test suite, from a fresh clone: venv + install, then pytest (SLURM tests install and
# start their own daemons; they skip only where the host forbids network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
# DeepSpeed JIT-builds a few ops; keep them with this venv, not in a cache shared by other checkouts
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
