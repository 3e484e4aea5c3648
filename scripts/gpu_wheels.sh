#!/usr/bin/env bash
# Here (not on the GPU machine): put into .whl/ the wheels the lent GPU machine's image lacks, at the versions
# this checkout's .venv tests with, for its Python 3.12 on x86-64. DeepSpeed publishes only a source
# distribution; its wheel is pure Python (DS_BUILD_OPS=0: s3dist uses no compiled DeepSpeed op) and is built here.
# Then run scripts/gpu_checks.sh there with .whl carried (see that script).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The image has torch, accelerate, pyarrow, pandas, fsspec, huggingface-hub, scikit-learn, tensorboard, ...
# (the device tool's KINDS.md lists them); these it does not.
NEEDED=(datasets dill multiprocess hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions)
pins=()
for name in "${NEEDED[@]}" deepspeed; do
  pins+=("$name==$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir .whl
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]:0:${#NEEDED[@]}}"
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl "${pins[-1]}"
ls .whl
du -sh .whl
