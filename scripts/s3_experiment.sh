#!/usr/bin/env bash
# The S3 experiment of README "Reproducing S3 > The experiment": S3 as the paper defines it against
# plain MoE, dense and CLIP-style contrastive encoders at equal active parameters, 3 seeds, on
#   factors  synthetic v2 (s3dist.data.synth kind=factors): the label needs shared AND modality-unique
#            factors, inputs carry nuisance factors; S3's theory predicts a gain here;
#   shared   its control: the same generator, the label from shared factors only (no predicted gain);
#   digits   scikit-learn's 8x8 digits as two views (top / bottom half), a real data set shipped in a package.
# plus ablations of S3 on `factors` (representation, compactness form, Selection, pruning unit and
# threshold rule). Every run is 2 processes with expert parallelism (ep_size=2), as the default job.
#
#   bash scripts/s3_experiment.sh                 # everything (about 80 minutes on 2 CPU cores)
#   DATASETS=factors SEEDS=0 bash scripts/s3_experiment.sh
#   .venv/bin/python scripts/s3_experiment_report.py runs/s3-exp     # tables + plots
#
# Results: $OUT/<data>/<method>-s<seed>/eval.json, seed aggregates $OUT/<data>/<method>/sweep_seeds.json.
# Difficulty of the synthetic sets (fixed before any method was compared, README): the generator's
# defaults (4 shared, 4 unique, 4 nuisance factors per modality, noise std 0.3, 3 modalities).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # venv, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
export OMP_NUM_THREADS=1
OUT="${OUT:-runs/s3-exp}"
SEEDS="${SEEDS:-0 1 2}"
DATASETS="${DATASETS:-factors shared digits}"
PORT="${PORT:-29710}"
S3DIST=.venv/bin/s3dist

# method name -> recipe + overrides. Active parameters per token are equal: k x expert_hidden = 256 = the
# dense FFN's hidden width (chi=2: k=2 x 128; chi=8: k=8 x 32, N = chi x rho = 16).
declare -A METHOD=(
  [s3-chi2]="s3_synth.yaml"
  [s3-chi8]="s3_synth.yaml moe.granularity=8 moe.expansion=2 moe.expert_hidden=32"
  [moe]="moe_synth.yaml"
  [dense]="dense_synth.yaml"
  [clip]="dense_synth.yaml stages.intra_weight=0"
  # ablations of S3 chi=2 (factors only)
  [s3-expert-output]="s3_synth.yaml model.representation=expert_output"
  [s3-entropy]="s3_synth.yaml stages.compactness=entropy"
  [s3-no-selection]="s3_synth.yaml stages.run=specialize,sparsify"
  [s3-stem]="s3_synth.yaml model.arch=stem"
)
MAIN_METHODS="s3-chi2 s3-chi8 moe dense clip"
ABLATIONS="s3-expert-output s3-entropy s3-no-selection s3-stem"

data_args() {  # data set -> overrides (the synthetic sets are generated per seed inside each run)
  case "$1" in
    factors) echo "data.synth.kind=factors data.synth.seed=$2" ;;
    shared) echo "data.synth.kind=factors data.synth.label_mode=shared data.synth.seed=$2" ;;
    digits) echo "data.path=$OUT/data/digits" ;;
  esac
}

if [[ " $DATASETS " == *" digits "* ]] && [ ! -f "$OUT/data/digits/manifest.json" ]; then
  mkdir -p "$OUT/data"
  .venv/bin/python scripts/make_digits.py --out "$OUT/data/digits-arrays"
  $S3DIST data import-arrays --modality top="$OUT/data/digits-arrays/top.npy" \
    --modality bottom="$OUT/data/digits-arrays/bottom.npy" --labels "$OUT/data/digits-arrays/labels.npy" \
    --out "$OUT/data/digits" --overwrite
fi

train() {  # data method seed
  local dir="$OUT/$1/$2-s$3" spec data
  [ -f "$dir/eval.json" ] && return 0
  read -r -a spec <<< "${METHOD[$2]}"
  read -r -a data <<< "$(data_args "$1" "$3")"
  .venv/bin/accelerate launch --config_file launch_configs/cpu_2proc.yaml --main_process_port "$PORT" \
    -m s3dist.train --config "launch_configs/recipes/${spec[0]}" --output_dir "$dir" --overwrite \
    seed="$3" "${data[@]}" "${spec[@]:1}" logging.progress=false logging.tensorboard=false
}

aggregate() {  # data method [suffix]
  local runs=()
  for seed in $SEEDS; do runs+=("$OUT/$1/$2-s$seed${3:-}"); done
  $S3DIST sweep --run "${runs[@]}" --out "$OUT/$1/$2${3:-}" > /dev/null
}

for data in $DATASETS; do
  methods="$MAIN_METHODS"
  [ "$data" = factors ] && methods="$methods $ABLATIONS"
  for seed in $SEEDS; do
    for method in $methods; do train "$data" "$method" "$seed"; done
    if [ "$data" = factors ]; then
      # evaluation-only ablations of the same trained S3 chi=2 models: pruning unit and threshold rule
      for variant in sample-pairs:stages.prune_unit=sample_pairs batch-rule:stages.prune_threshold=batch \
                     last-layer:stages.prune_layers=last; do
        name="${variant%%:*}" dir="$OUT/$data/s3-chi2-s$seed-$name"
        [ -f "$dir/eval.json" ] && continue
        mkdir -p "$dir"
        $S3DIST sweep --run "$OUT/$data/s3-chi2-s$seed" --out "$dir" "${variant#*:}" > /dev/null
      done
    fi
  done
  for method in $methods; do aggregate "$data" "$method"; done
  if [ "$data" = factors ]; then
    for name in sample-pairs batch-rule last-layer; do aggregate "$data" s3-chi2 "-$name"; done
  fi
done
echo "results under $OUT; tables: .venv/bin/python scripts/s3_experiment_report.py $OUT"
