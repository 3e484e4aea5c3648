"""Run a function on N real processes joined by a gloo process group (no mocked collectives).

`run_ranks(fn, world, tmp_path, *args)` spawns `world` processes; each sets the torchrun-style
environment, calls `fn(rank, world, out_dir, *args)`, and may `torch.save` results into
`out_dir / f"rank{rank}.pt"`. Returns the list of per-rank results. A rank that raises fails the
test with its traceback; a hang is bounded by pytest-timeout and the group's own timeout.

The ranks fork from a multiprocessing forkserver that has imported torch, DeepSpeed, s3dist and what a
training run pulls in (torch._dynamo for the optimizer, the modules DeepSpeed imports when it builds an
engine, scikit-learn for the probes). A spawned rank imports all of that itself: about 15 s of a 2-rank
test's 20-40 s on a 2-core machine, paid again by every such test. The server is started once per test
session as a new process (not a fork of pytest) that only imports, so every rank still starts from a process
that holds no thread, no process group and no state of an earlier test. Each rank takes the test's
environment as it is when `run_ranks` is called, as a spawned one would.

`run_main(module, argv)` runs a command's `main(argv)` (`s3dist.train`, `s3dist.cli`) that way, on each
rank, and returns what `subprocess.run` would: exit code and output. It is for tests of what a command does;
tests of how a job is launched, signalled or killed start the real launcher (tests/launching.py).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from s3dist.dist import free_port as _free_port


# What a rank imports on its way through a training run and an evaluation, heaviest first.
# s3dist.model.moe imports DeepSpeed first, as it does in a real rank (without mlflow: s3dist.importing).
_PRELOAD = ["torch", "torch._dynamo", "s3dist.model.moe", "deepspeed.runtime.zero.muon.muon_optimizer",
            "sklearn.linear_model", "datasets", "s3dist.train", "s3dist.cli", "s3dist.eval_cli", "tests.multirank"]


def _entry(rank, environ, world, port, out_dir, fn, args):
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        result = fn(rank, world, Path(out_dir), *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    # Tear the group down while every rank is alive: leaving it to interpreter exit can abort a
    # rank ("terminate called without an active exception") as gloo threads are destroyed.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(fn, world: int, out_dir: Path, *args):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    try:
        mp.set_forkserver_preload(_PRELOAD)
        mp.start_processes(_entry, args=(dict(os.environ), world, port, str(out_dir), fn, args), nprocs=world,
                           join=True, start_method="forkserver")
    except Exception as e:
        errs = "\n".join(p.read_text() for p in sorted(out_dir.glob("rank*.err")))
        raise AssertionError(f"a rank failed:\n{errs or e}") from e
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _main_on_rank(rank, world, out_dir, module, argv):
    """One rank of `python -m module *argv`: its stdout and stderr go to files (file descriptors, so what
    DeepSpeed and gloo print is there too); returns the exit code."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(out_dir / f"rank{rank}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    try:
        code = importlib.import_module(module).main(argv)
    except SystemExit as e:  # e.g. the requeue exit (75)
        code = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    return code if isinstance(code, int) else int(code is not None)


def run_main(module: str, argv: list, world: int = 2) -> subprocess.CompletedProcess:
    """`python -m module *argv` as a job of `world` ranks; returncode is the first non-zero rank's (else 0),
    stdout and stderr are the ranks' in rank order."""
    out_dir = Path(tempfile.mkdtemp(prefix="s3dist-main-"))
    argv = [str(a) for a in argv]
    try:
        codes = run_ranks(_main_on_rank, world, out_dir, module, argv)
        text = {name: "".join((out_dir / f"rank{r}.{name}").read_text(errors="replace") for r in range(world))
                for name in ("stdout", "stderr")}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return subprocess.CompletedProcess([module, *argv], next((c for c in codes if c), 0), text["stdout"],
                                       text["stderr"])
