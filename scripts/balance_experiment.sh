#!/usr/bin/env bash
# The balancing table of BENCHMARKS.md "Balancing and drops" (issue #20): how S3's Stage-1 load balancing and capacity
# drops compare on synthetic v2 (data.synth.kind=factors, as scripts/s3_experiment.sh makes it), 3 seeds,
#   aux_loss   the default: Switch-style balance loss on global routing fractions (moe.aux_loss_weight)
#   bias       DeepSeek-V3's auxiliary-loss-free rule (moe.balance=bias, moe.bias_update_rate)
#   none       no balancing at all (moe.balance=none)
#   dropless   aux_loss without capacity drops (moe.drop_tokens=false)
# Each run is S3 chi=2 (launch_configs/recipes/s3_synth.yaml: N=4, k=2, all three stages) on 2 processes
# with expert parallelism (ep_size=2), the s3_experiment.sh run recipe. 3-5 minutes a run on 2 CPU cores
# shared with other jobs: the 12 runs took 49 minutes (BENCHMARKS.md "Balancing and drops"); STEPS / SELECT_STEPS shorten it.
#
#   bash scripts/balance_experiment.sh
#   SEEDS=0 VARIANTS="aux_loss bias" bash scripts/balance_experiment.sh
#   OUT=runs/balance-chi8 SEEDS=0 VARIANTS="aux_loss bias none" \
#     EXTRA="moe.granularity=8 moe.expert_hidden=32" bash scripts/balance_experiment.sh    # fine-grained: N=16, k=8
#   OUT=runs/bias-rate SEEDS=0 VARIANTS="bias_r1e-4 bias bias_r1e-2" bash scripts/balance_experiment.sh
#   .venv/bin/python scripts/balance_report.py runs/balance        # the markdown table
#
# Results: $OUT/<variant>-s<seed>/{metrics.jsonl,eval.json}. A run whose eval.json exists is skipped.
# Unlike s3_experiment.sh this does not run scripts/setup_venv.sh: it expects the venv to exist.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
VENV="${VENV:-$PWD/.venv}"    # VENV=/path/.venv to run a git worktree of this repository with the main venv
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
export OMP_NUM_THREADS=1
# this checkout's s3dist, also when the venv's editable install points at another one (a git worktree)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/balance}"
SEEDS="${SEEDS:-0 1 2}"
VARIANTS="${VARIANTS:-aux_loss bias none dropless}"
PORT="${PORT:-29730}"
STEPS="${STEPS:-150}"          # Stage 1 (the recipe's default); the balancing rule acts here
SELECT_STEPS="${SELECT_STEPS:-60}"
EXTRA="${EXTRA:-}"            # overrides added to every run (e.g. another granularity)
read -r -a extra_all <<< "$EXTRA"

mkdir -p "$OUT"
declare -A VARIANT=(
  [aux_loss]="moe.balance=aux_loss"
  [bias]="moe.balance=bias"
  [none]="moe.balance=none"
  [dropless]="moe.balance=aux_loss moe.drop_tokens=false"
  [bias_r1e-4]="moe.balance=bias moe.bias_update_rate=1e-4"   # bias_update_rate sweep around the default 1e-3
  [bias_r1e-2]="moe.balance=bias moe.bias_update_rate=1e-2"
)

for seed in $SEEDS; do
  for v in $VARIANTS; do
    dir="$OUT/$v-s$seed"
    [ -f "$dir/eval.json" ] && continue
    read -r -a extra <<< "${VARIANT[$v]}"
    echo "$(date +%T) $v seed $seed -> $dir"
    "$VENV/bin/accelerate" launch --config_file launch_configs/cpu_2proc.yaml --main_process_port "$PORT" \
      -m s3dist.train --config launch_configs/recipes/s3_synth.yaml --output_dir "$dir" --overwrite \
      seed="$seed" data.synth.kind=factors data.synth.seed="$seed" "${extra[@]}" ${extra_all[@]+"${extra_all[@]}"} \
      stages.specialize_steps="$STEPS" stages.select_steps="$SELECT_STEPS" \
      logging.progress=false logging.tensorboard=false > "$OUT/$v-s$seed.log" 2>&1 \
      || { echo "run failed: $OUT/$v-s$seed.log" >&2; tail -20 "$OUT/$v-s$seed.log" >&2; exit 1; }
  done
done
echo "results under $OUT; table: $VENV/bin/python scripts/balance_report.py $OUT"
