#!/usr/bin/env bash
# The EARLIER S3 synthetic experiment (README "Earlier forms on shared-only data"): S3 in the forms s3dist
# used before the paper's own description was available (conv stem, one MoE layer, pooled expert output,
# routing-entropy compactness with the balance loss in Stage 2, (sample, expert) pruning of the last
# layer, renormalised, per batch) vs plain MoE vs dense contrastive, 3 seeds each, same data, same probe.
# Kept to reproduce that table; `EARLIER` below restores those forms on today's code (one difference
# remains: evaluation no longer drops tokens over capacity). The current experiment is s3_experiment.sh. Results: runs/synth-exp/<method>-s<seed>/eval.json and the seed aggregates
# runs/synth-exp/<method>/sweep_seeds.json (mean ± std per keep fraction).
#
# Data difficulty (same for every method, fixed before comparing them): 12 concepts, label = any of
# the first 3; noise std 1.0 and nuisance scale 1.5 relative to a unit-std concept signal, so the probe
# does not saturate. Everything else is the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # venv, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
export OMP_NUM_THREADS=1
OUT="${OUT:-runs/synth-exp}"
SEEDS="${SEEDS:-0 1 2}"
METHODS="${METHODS:-s3 moe dense}"
EARLIER=(model.arch=stem model.num_layers=1 model.representation=expert_output)
EARLIER_S3=(stages.compactness=entropy stages.compact_weight=0.1 stages.select_balance_weight=0.01
            stages.prune_unit=sample_pairs stages.prune_layers=last stages.prune_renormalize=true
            stages.prune_threshold=batch eval.keep_fractions=0.05,0.1,0.2,0.3,0.5,0.7,1.0)
DATA=(data.synth.num_concepts=12 data.synth.label_concepts=3 data.synth.noise_std=1.0 data.synth.nuisance_scale=1.5)
for seed in $SEEDS; do
  for method in $METHODS; do
    dir="$OUT/$method-s$seed"
    [ -f "$dir/eval.json" ] && continue
    forms=("${EARLIER[@]}"); [ "$method" = s3 ] && forms+=("${EARLIER_S3[@]}")
    .venv/bin/accelerate launch --config_file launch_configs/cpu_2proc.yaml --main_process_port $((29600 + seed)) \
      -m s3dist.train --config "launch_configs/recipes/${method}_synth.yaml" --output_dir "$dir" --overwrite \
      seed="$seed" data.synth.seed="$seed" "${DATA[@]}" "${forms[@]}" logging.progress=false "$@"
  done
done
for method in $METHODS; do
  runs=(); for seed in $SEEDS; do runs+=("$OUT/$method-s$seed"); done
  .venv/bin/s3dist sweep --run "${runs[@]}" --out "$OUT/$method"
done
