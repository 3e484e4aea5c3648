#!/usr/bin/env bash
# The embedded default end to end: synthetic multimodal data, 2 processes (gloo on CPU, nccl on
# GPUs), DeepSpeed expert parallelism (ep_size=2), S3 Stages 1-3, probe + sparsity sweep,
# TensorBoard logs. Extra arguments are passed to s3dist.train (e.g. stages.specialize_steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh  # venv, DS_ACCELERATOR, TORCH_EXTENSIONS_DIR
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="runs/demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/accelerate launch --config_file launch_configs/cpu_2proc.yaml -m s3dist.train --output_dir "$out" "$@"
echo "run directory: $out   (TensorBoard: .venv/bin/tensorboard --logdir $out/tb)"
