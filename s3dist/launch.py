"""Cluster launching: the per-node launcher that `slurm/*.sbatch` runs on every node.

Nothing in the training loop knows about SLURM; what is cluster-specific lives here and in
`slurm/` (`common.sh` builds each node's command from SLURM's environment). Every command is an
argv list run without a shell: user values (run names, output directories, overrides) are single
list elements, so spaces, quotes or `$(...)` in them reach `s3dist.train` verbatim and are never
executed.

`python -m s3dist.launch ARGS` is `accelerate launch ARGS` with two differences that requeueing
needs (the training processes exit with `EXIT_REQUEUE` after checkpointing on SIGUSR2/SIGTERM):

* torchrun, which accelerate runs in-process, dies on SIGUSR2 (default action) and turns a
  worker's exit code 75 into a generic failure. This launcher catches SIGUSR2 and forwards it
  to the workers (torchrun starts them in their own sessions, so a process-group signal would
  miss them), and exits with 75 when a worker asked for a requeue.
* It prints the argv it runs, so the job log shows what each node executed.

The worker side of the same process tree is `exit_with_launcher`: torchrun starts workers in their
own sessions, so when the launcher itself is killed (SIGKILL by a user, a watchdog or the OOM killer:
no signal can be forwarded) the workers would train on, orphaned, publishing and rotating checkpoints
under whatever job is started next in the run directory. Each worker asks the kernel to kill it when
its parent, the launcher, dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

from s3dist import EXIT_REQUEUE

LAUNCHER_PID_ENV = "S3DIST_LAUNCHER_PID"  # set by this launcher for its workers
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # torchrun / accelerate run in this process: the parent
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


# --------------------------------------------------------------------------------------------
# The worker side: die with the launcher
# --------------------------------------------------------------------------------------------


def launcher_pid() -> int | None:
    """Pid of the launcher that started this process (its parent), None when no launcher did.

    torchrun marks its workers with TORCHELASTIC_RUN_ID, accelerate's single-process launcher with
    ACCELERATE_USE_CPU; a plain `python -m s3dist.train` (under nohup, say) must not die with its shell.
    """
    if os.environ.get(LAUNCHER_PID_ENV, "").isdigit():
        pid = int(os.environ[LAUNCHER_PID_ENV])
        # Our parent, or gone (it died before we looked: exit_with_launcher then stops us). A live process that
        # is not our parent set the variable for other processes, and it came down to us by inheritance.
        return pid if os.getppid() == pid or not _alive(pid) else None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return os.getppid()
    if "ACCELERATE_USE_CPU" in os.environ and _parent_runs("accelerate"):  # not a value exported in a shell
        return os.getppid()
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _parent_runs(name: str) -> bool:
    """Whether the parent's command line mentions `name` (Linux's /proc; elsewhere assumed, as before)."""
    try:
        return name in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return not sys.platform.startswith("linux")


def _watch_parent(expected: int, interval_s: float) -> None:
    while os.getppid() == expected:
        threading.Event().wait(interval_s)
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with_launcher(poll_s: float = 1.0) -> int | None:
    """Have the kernel SIGKILL this process when its launcher dies; returns the launcher's pid, or None
    when this process was not started by one (nothing is armed then).

    Linux: prctl(PR_SET_PDEATHSIG), which fires when the thread that forked us exits; torchrun's agent
    (run by accelerate in the launcher process itself) starts workers from its main thread. Elsewhere
    a daemon thread polls the parent pid. SIGKILL, not SIGTERM: SIGTERM asks the training to
    checkpoint for a requeue, which needs every rank, and the launcher that would collect the exit
    code is gone. A checkpoint being written is then left under its temporary name; published ones
    are complete (s3dist.checkpoint renames a checkpoint into place only once every rank wrote it).
    """
    expected = launcher_pid()
    if expected is None:
        return None
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(expected, poll_s), name="s3dist-launcher-watch",
                         daemon=True).start()
    if os.getppid() != expected:  # the launcher died before the signal was armed
        print(f"s3dist: the launcher (pid {expected}) that started this process is gone; stopping", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return expected


if __name__ == "__main__":
    sys.exit(main())
