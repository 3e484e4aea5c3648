"""Cluster launching: the per-node launcher and the few helpers SLURM scripts need.

Nothing in the training loop knows about SLURM; what is cluster-specific lives here and in
`slurm/*.sbatch`. Every command is built as an argv list and run without a shell: user values
(run names, output directories, overrides) are single list elements, so spaces, quotes or
`$(...)` in them reach `s3dist.train` verbatim and are never executed.

`python -m s3dist.launch ARGS` is `accelerate launch ARGS` with two differences that requeueing
needs (the training processes exit with `EXIT_REQUEUE` after checkpointing on SIGUSR2/SIGTERM):

* torchrun, which accelerate runs in-process, dies on SIGUSR2 (default action) and turns a
  worker's exit code 75 into a generic failure. This launcher catches SIGUSR2 and forwards it
  to the workers (torchrun starts them in their own sessions, so a process-group signal would
  miss them), and exits with 75 when a worker asked for a requeue.
* It prints the argv it runs, so the job log shows what each node executed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from s3dist import EXIT_REQUEUE

DEFAULT_PORT_BASE = 20000


def head_node(nodelist: str) -> str:
    """First host of a SLURM node list (`node[01-04]` -> `node01`), via `scontrol show hostnames`."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                         text=True).stdout.split()
    if not out:
        raise ValueError(f"SLURM node list {nodelist!r} expands to no host names")
    return out[0]


def rendezvous_port(job_id: int | str, base: int = DEFAULT_PORT_BASE, span: int = 20000) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return base + int(job_id) % span


def launch_argv(*, train_args: list[str], config_file: str | Path | None = None, num_machines: int = 1,
                machine_rank: int = 0, procs_per_node: int = 1, main_process_ip: str | None = None,
                main_process_port: int | None = None, module: str = "s3dist.train",
                python: str = sys.executable) -> list[str]:
    """The per-node command (`python -m s3dist.launch ... -m MODULE TRAIN_ARGS`) as an argv list.

    `train_args` are passed through untouched, one element each. `procs_per_node` is the number
    of training processes on this node (GPUs, or CPU processes); accelerate wants the total.
    """
    if num_machines < 1 or procs_per_node < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"bad layout: num_machines={num_machines}, machine_rank={machine_rank}, "
                         f"procs_per_node={procs_per_node}")
    argv = [python, "-m", "s3dist.launch"]
    if config_file is not None:
        argv += ["--config_file", str(config_file)]
    argv += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank),
             "--num_processes", str(num_machines * procs_per_node)]
    if num_machines * procs_per_node > 1:
        argv += ["--multi_gpu"]  # torchrun; on CPU it runs gloo (PLATFORM_NOTES: --cpu needs MPI)
    if main_process_ip is not None:
        argv += ["--main_process_ip", main_process_ip]
    if main_process_port is not None:
        argv += ["--main_process_port", str(main_process_port)]
    return argv + ["-m", module, *train_args]


# --------------------------------------------------------------------------------------------
# The per-node launcher
# --------------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return kids


def _forward_signal(signum, _frame) -> None:
    # Under SLURM the workers usually get the signal themselves too (proctrack signals the whole
    # step); the training's handler only sets a stop flag, so a second delivery is harmless.
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _requeue_requested(exc: BaseException) -> bool:
    failures = getattr(exc, "failures", None)  # torch ChildFailedError: {rank: ProcessFailure}
    if failures:
        return any(getattr(f, "exitcode", None) == EXIT_REQUEUE for f in failures.values())
    return getattr(exc, "returncode", None) == EXIT_REQUEUE  # accelerate's single-process path


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    args = launch_command_parser().parse_args(argv)
    print(f"s3dist.launch on {os.uname().nodename}: accelerate launch {argv}", flush=True)
    signal.signal(signal.SIGUSR2, _forward_signal)
    try:
        launch_command(args)
    except Exception as e:  # ChildFailedError, CalledProcessError: both carry the workers' codes
        if _requeue_requested(e):
            print(f"s3dist.launch: training checkpointed and asked for a requeue (exit {EXIT_REQUEUE})",
                  flush=True)
            return EXIT_REQUEUE
        print(f"s3dist.launch: training failed: {e!r}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
