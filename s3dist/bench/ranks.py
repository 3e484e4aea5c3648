"""Rank plumbing of the rank-level benchmarks (`s3dist bench moe`, `s3dist bench train`): fresh processes
with a torchrun-style environment, and a count of the bytes each all-to-all moves."""

from __future__ import annotations

import os
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from s3dist.bench.common import quiet_profiler_console
from s3dist.dist import free_port as _free_port


def _rank_entry(rank, world, port, threads, out_dir, fn, args):
    import torch

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    quiet_profiler_console()  # every rank-level benchmark profiles a pass
    # DS_ACCELERATOR is left to init_distributed (cuda where torch sees a GPU, else cpu): forcing cpu
    # here made DeepSpeed keep the model on the CPU under nccl on a GPU machine.
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def spawn_ranks(fn, ranks: int, *args, threads: int = 0) -> list:
    """Run `fn(rank, world, *args)` on `ranks` fresh processes (torchrun-style env); their results.

    `threads` per rank defaults to the usable cores divided by the ranks, so ranks do not fight
    over cores (that would time the scheduler, not the code).
    """
    import torch
    import torch.multiprocessing as mp

    if threads <= 0:
        threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    with tempfile.TemporaryDirectory(prefix="s3dist-bench-") as out_dir:
        try:
            mp.spawn(_rank_entry, args=(ranks, _free_port(), threads, out_dir, fn, args), nprocs=ranks, join=True)
        except Exception as e:
            errs = "\n".join(p.read_text() for p in sorted(Path(out_dir).glob("rank*.err")))
            raise RuntimeError(f"a benchmark rank failed:\n{errs or e}") from e
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(ranks)]


@dataclass
class CollectiveBytes:
    """What this rank handed to `all_to_all_single` (equal splits only, as DeepSpeed's MoE uses)."""

    calls: int = 0
    buffer_bytes: int = 0      # sum of input buffer sizes
    offrank_bytes: int = 0     # of those, bytes that leave this rank ((ep-1)/ep of each buffer)


@contextmanager
def count_collective_bytes():
    """Wrap `torch.distributed.all_to_all_single` (which DeepSpeed's `_AllToAll` calls, forward and
    backward) and count the bytes each call moves."""
    import torch.distributed as dist

    counts = CollectiveBytes()
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if output_split_sizes is not None or input_split_sizes is not None:
            raise RuntimeError("count_collective_bytes models equal splits only")
        nbytes = input.numel() * input.element_size()
        size = dist.get_world_size(group)
        counts.calls += 1
        counts.buffer_bytes += nbytes
        counts.offrank_bytes += nbytes * (size - 1) // size
        return original(output, input, output_split_sizes, input_split_sizes, group, async_op)

    dist.all_to_all_single = counting
    try:
        yield counts
    finally:
        dist.all_to_all_single = original
