#!/usr/bin/env bash
# On a lent GPU machine, in one call (issue #20's GPU checks; BENCHMARKS.md "GPU (not run ...)"):
#   first, here:   bash scripts/gpu_wheels.sh
#   then the device tool:  run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# In order of importance, each step under its own time limit so one hang cannot eat the lease:
#   1. tests/test_cuda.py: one GPU trains all stages in fp32 and bf16, fp32 CUDA losses equal the CPU
#      path's, bench train reports MFU (the code since the last GPU run has never run on CUDA);
#   2. bench train at LARGE (bf16, one GPU) with the fine-grained experts (chi = 8), the per-expert loop
#      against the grouped GEMMs (what moe.expert_compute=auto runs on CUDA): ms/step, MFU, aten ops,
#      host ms;
#   3. the same at LARGE's own granularity, if time is left.
# Results land in $OUT (at most 8 files come back): machine.txt, steps.log, and one JSON per bench run.
set -uo pipefail
OUT=${OUT:-/tmp/s3dist-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed: run scripts/gpu_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
unset DS_ACCELERATOR
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc
  python3 -c "import sys, torch, deepspeed, datasets; print(sys.version.split()[0], torch.__version__, deepspeed.__version__, datasets.__version__)"
  git log -1 --format='%H %s' 2>/dev/null; } > "$OUT/machine.txt" 2>&1
log="$OUT/steps.log"

step() {  # step NAME SECONDS COMMAND...: run, keep its output, note the outcome
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date -u +%T), limit ${limit}s): $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1
  echo "=== $name rc=$?" >> "$log"
}

# LARGE as in BENCHMARKS.md "GPU" (MOSI-shaped rows, d_model 512, 4 MoE blocks), on today's model keys
LARGE=(model.d_model=512 model.num_layers=4 data.batch_size=256 data.synth.seq_len=50
       data.synth.modality_dims=300,74,35 data.synth.num_train=2048 dist.dtype=bf16)
# chi = 8: k = 8, N = 16 per modality, k x hidden = 8 x 1024 = LARGE's 4 x 2048 active width
FINE=(moe.granularity=8 moe.num_experts=0 moe.top_k=0 moe.expert_hidden=1024)
bench() {  # bench NAME SECONDS OVERRIDES...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" python3 -m s3dist.cli bench train --ranks 1 --ep 1 --repeats 10 --warmup 3 --profile-steps 2 \
    --no-compare --json "$OUT/$name.json" "${LARGE[@]}" "$@"
}

step test_cuda 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
bench fine_loop 80 "${FINE[@]}" moe.expert_compute=loop
bench fine_grouped 80 "${FINE[@]}" moe.expert_compute=auto
bench large_loop 60 moe.num_experts=12 moe.top_k=4 moe.expert_hidden=2048 moe.expert_compute=loop
bench large_grouped 60 moe.num_experts=12 moe.top_k=4 moe.expert_hidden=2048 moe.expert_compute=auto
grep "^=== .* rc=" "$log"
