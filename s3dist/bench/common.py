"""Shared benchmark harness: machine / version facts, a plain-text table, and the JSON record that
every `s3dist bench ...` subcommand writes (command, versions, machine, date, figures)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, refused by argparse (exit 2, the flag named) otherwise, before
    any rank starts rather than as a ZeroDivisionError or an assertion inside one."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


def positive(text: str) -> float:
    """An argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("s3dist", "torch", "deepspeed", "datasets", "pyarrow", "numpy", "fsspec"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count()}
    try:
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def quiet_profiler_console() -> None:
    """Keep torch.profiler's kineto from printing "USDT: ... profiler_start" / "profiler_stop" on every profiled
    pass. Kineto (torch 2.13) emits those start/stop markers for tracing tools at a log level above ERROR, so
    only the level past it (6) hides them, and kineto's own errors with them; the bench reads the profile's
    events, not kineto's console. Call before a process's first profile (kineto reads the variable once); a
    KINETO_LOG_LEVEL already set (e.g. 4 to see errors) is left alone."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


@contextmanager
def timer():
    """`with timer() as t: ...` then `t()` gives the elapsed seconds."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def print_table(rows: list[dict], columns: list[str] | None = None, file=None) -> None:
    file = file or sys.stdout
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)), file=file)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
    return str(v)


def _numeric(s: str) -> bool:
    return s.replace(",", "").replace(".", "", 1).lstrip("-").isdigit()


def record(name: str, figures: dict, *, command: list[str] | None = None, out: str | None = None) -> dict:
    """The JSON record of one benchmark run; written to `out` when given."""
    doc = {"benchmark": name, "command": " ".join(["s3dist", *(command if command is not None else sys.argv[1:])]),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "versions": versions(), "figures": figures}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return doc


def interleaved_times(steps: dict, *, warmup: int, repeats: int) -> tuple[dict, dict, dict]:
    """Time several step functions on every rank of a process group, alternating their order each
    repetition so drift on a shared machine hits all of them alike.

    Returns (wall, cpu, results) per name: wall seconds per repetition as the slowest rank's (a step
    takes as long as its slowest rank), this rank's CPU seconds (all its threads, waiting excluded: the
    figure that survives a machine shared with other jobs), and each call's return value. Must be called
    on every rank.
    """
    import torch
    import torch.distributed as dist

    from s3dist.dist import collective_device

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    results = {name: [] for name in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            results[name].append(steps[name]())
            sync()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    stacked = torch.tensor([wall[n] for n in names], dtype=torch.float64, device=collective_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
    return {n: stacked[i].tolist() for i, n in enumerate(names)}, cpu, results
