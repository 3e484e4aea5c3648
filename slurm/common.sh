# Shared by slurm/*.sbatch (sourced, not run). Sets up the environment every s3dist job needs
# and defines the per-node launch. User values only ever travel as quoted array elements.
#
# Environment it reads (all optional; the sbatch scripts document them too):
#   S3DIST_ROOT            s3dist checkout (for the default python and accelerate config)
#                          [$SLURM_SUBMIT_DIR]
#   S3DIST_PYTHON          python with s3dist installed  [$S3DIST_ROOT/.venv/bin/python, else python3]
#   S3DIST_ACCEL_CONFIG    accelerate config file        [$S3DIST_ROOT/launch_configs/multinode.yaml]
#   S3DIST_PROCS_PER_NODE  training processes per node   [$SLURM_GPUS_ON_NODE, else 1]
#   S3DIST_PORT            rendezvous port on the head node [20000 + job id % 20000]

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "s3dist: SLURM_JOB_ID is not set: this is a batch script, submit it with sbatch (README: Running on a cluster)" >&2
  exit 2
fi
S3DIST_ROOT=${S3DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [[ -z ${S3DIST_PYTHON:-} ]]; then
  if [[ -x $S3DIST_ROOT/.venv/bin/python ]]; then S3DIST_PYTHON=$S3DIST_ROOT/.venv/bin/python
  else S3DIST_PYTHON=python3; fi
fi
S3DIST_ACCEL_CONFIG=${S3DIST_ACCEL_CONFIG:-$S3DIST_ROOT/launch_configs/multinode.yaml}
S3DIST_PROCS_PER_NODE=${S3DIST_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
S3DIST_PORT=${S3DIST_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
S3DIST_RESTART=${SLURM_RESTART_COUNT:-0}
if ! [[ $S3DIST_PROCS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
  echo "s3dist: S3DIST_PROCS_PER_NODE='$S3DIST_PROCS_PER_NODE' must be a whole number >= 1 (training processes per node)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1

# s3dist_find_output_dir ARGS... : print the run directory the training arguments name, with
# s3dist.train's precedence (--output_dir / --output-dir over an output_dir= override, the last
# of each kind winning); nothing if absent.
s3dist_find_output_dir() {
  local flag="" override="" prev=""
  for a in "$@"; do
    [[ $prev == --output_dir || $prev == --output-dir ]] && flag=$a
    case $a in
      --output_dir=* | --output-dir=*) flag=${a#*=} ;;
      output_dir=*) override=${a#output_dir=} ;;
    esac
    prev=$a
  done
  printf '%s' "${flag:-$override}"
}

# s3dist_srun LOG_PATTERN MODULE ARGS... : one `accelerate launch` per node (through
# s3dist.launch, which passes the requeue exit code 75 through torchrun), every node taking
# part in one rendezvous at the head node. Returns srun's exit code.
s3dist_srun() {
  local log_pattern=$1 module=$2 head_node
  shift 2
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  local launch=(
    --config_file "$S3DIST_ACCEL_CONFIG"
    --num_machines "$SLURM_NNODES"
    --num_processes "$((SLURM_NNODES * S3DIST_PROCS_PER_NODE))"
    --main_process_ip "$head_node"
    --main_process_port "$S3DIST_PORT"
  )
  if (( SLURM_NNODES * S3DIST_PROCS_PER_NODE > 1 )); then launch+=(--multi_gpu); fi
  echo "s3dist: $SLURM_NNODES node(s) x $S3DIST_PROCS_PER_NODE process(es), head $head_node:$S3DIST_PORT," \
       "restart $S3DIST_RESTART, logs $log_pattern"
  # The program given to bash -c is a constant: \$SLURM_NODEID (single-quoted here) expands on
  # each node to that node's rank; everything else arrives as positional arguments.
  srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=0 \
       --open-mode=append --output="$log_pattern" \
       bash -c 'py=$1; shift; exec "$py" -m s3dist.launch --machine_rank "$SLURM_NODEID" "$@"' \
       s3dist-node "$S3DIST_PYTHON" "${launch[@]}" -m "$module" "$@"
}

# s3dist_train_job ARGS... : the whole training job. Pins the run directory (so a requeued job
# finds its checkpoints), adds `--resume auto` last after a restart, logs into the run directory,
# launches, and requeues the job when training exits 75 after checkpointing for pre-emption.
s3dist_train_job() {
  local train_args=("$@") run_dir rc
  run_dir=$(s3dist_find_output_dir "$@")
  if [[ -z $run_dir ]]; then
    run_dir=runs/slurm-$SLURM_JOB_ID
    train_args=(--output_dir "$run_dir" "${train_args[@]}")
  fi
  if (( S3DIST_RESTART > 0 )); then
    # last, so that it wins over a `--resume PATH` of the submission: a requeue continues from the newest
    # checkpoint, not from the one the job first started from (which would redo its work on every restart)
    train_args=("${train_args[@]}" --resume auto)
  fi
  mkdir -p -- "$run_dir/logs"
  exec > >(tee -a -- "$run_dir/logs/job-$SLURM_JOB_ID.log") 2>&1
  echo "s3dist: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST at $(date -Is), run dir: $run_dir"

  # srun expands %j / %n in --output; a literal % in the run dir must be doubled
  local log_pattern="${run_dir//\%/%%}/logs/job-%j-r$S3DIST_RESTART-node%n.log"
  set +e
  s3dist_srun "$log_pattern" s3dist.train "${train_args[@]}"
  rc=$?
  set -e
  if (( rc == 75 )); then
    echo "s3dist: training checkpointed for pre-emption; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  echo "s3dist: training exited with $rc at $(date -Is)"
  return "$rc"
}
