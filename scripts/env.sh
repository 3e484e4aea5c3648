# Sourced by scripts/*.sh from the repository root: this checkout's venv, created or brought up to date
# (scripts/setup_venv.sh), and the environment s3dist's jobs run in.
bash scripts/setup_venv.sh
# no NVIDIA GPU: DeepSpeed's CPU accelerator (the jobs use gloo)
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=cpu; fi
# DeepSpeed JIT-builds a few ops; keep them with this venv, not in a cache shared by other checkouts
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
