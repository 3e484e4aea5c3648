#!/usr/bin/env bash
# Create .venv and install s3dist with torch pinned FIRST: an unpinned torch (directly or via
# deepspeed/accelerate) would pull a multi-GB CUDA build on a CPU machine. On a CUDA machine the
# same pin resolves to the CUDA build. Re-running is cheap: a stamp skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${S3DIST_TORCH_VERSION:-2.13.0}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3.10 python3; do command -v "$c" >/dev/null 2>&1 && PY="$c" && break; done
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
export DS_BUILD_OPS=0            # DeepSpeed JIT-builds the few ops it needs at run time
stamp=".venv/.s3dist-installed-$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install -q -e ".[dev,wandb,mlflow]"   # trackers: tests/test_trackers.py runs them
  touch "$stamp"
fi
