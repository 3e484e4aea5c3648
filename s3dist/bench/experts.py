"""`s3dist bench experts`: forward+backward of one layer's local experts alone, DeepSpeed's per-expert
loop against `GroupedExperts`' batched GEMMs, over a grid of shapes; what `moe.expert_compute=auto`'s
CPU threshold (`CPU_GROUPED_MAX_ROWS_X_HIDDEN`) is read from.

One process, `--threads` torch threads, the received buffer [ep, E, C, d] as `MOELayer` hands it over.
The two paths alternate per repetition (order flipping) and the median of each one's process CPU time is
compared, so load from other jobs hits both alike. Each row also says what 'auto' would choose.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from s3dist.bench.common import at_least, print_table, record

# (local experts E, rows per expert = ep x C, d_model, hidden, ep): small shapes where dispatch dominates,
# the embedded default at ep=2 (6 local experts x 2,560 rows), chi=8 layers and the s3_mosei recipe's.
DEFAULT_SHAPES = [(2, 64, 8, 4, 1), (16, 64, 8, 4, 1), (32, 64, 8, 4, 2), (16, 320, 128, 64, 2),
                  (8, 640, 128, 64, 2), (6, 640, 64, 128, 2), (6, 2560, 64, 128, 2), (16, 1280, 128, 64, 2),
                  (24, 2560, 64, 32, 2), (24, 640, 128, 256, 2), (16, 5120, 128, 64, 2)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", default=[],
                   help="E,rows,d_model,hidden,ep (repeatable; default: a built-in grid)")
    p.add_argument("--warmup", type=at_least(0), default=2)
    p.add_argument("--repeats", type=at_least(1), default=12)
    p.add_argument("--threads", type=at_least(1), default=1)


def time_shape(e: int, rows: int, d: int, hidden: int, ep: int, warmup: int, repeats: int) -> dict:
    import torch

    from s3dist.model.experts import GroupedExperts, use_grouped

    torch.manual_seed(0)
    mod = GroupedExperts(d, hidden, e, "bench")
    with torch.no_grad():  # nn.Linear's scale (the stack starts uninitialised)
        for p in mod.parameters():
            p.uniform_(-p.shape[-1] ** -0.5, p.shape[-1] ** -0.5)
    x = torch.randn(ep, e, rows // ep, d, requires_grad=True)
    w = torch.randn(d)
    cpu: dict[str, list[float]] = {"loop": [], "grouped": []}
    names = list(cpu)
    for rep in range(warmup + repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            mod.compute = name
            c0 = time.process_time()
            (mod(x) * w).sum().backward()
            mod.zero_grad(set_to_none=True)
            x.grad = None
            if rep >= warmup:
                cpu[name].append(time.process_time() - c0)
    loop, grouped = (1e3 * statistics.median(cpu[n]) for n in names)
    return {"experts": e, "rows": rows, "d_model": d, "hidden": hidden, "ep": ep, "rows_x_hidden": rows * hidden,
            "loop_ms": loop, "grouped_ms": grouped, "loop_over_grouped": loop / grouped,
            "auto_cpu": "grouped" if use_grouped("auto", e, rows, hidden, torch.device("cpu")) else "loop"}


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] or DEFAULT_SHAPES
    rows = [time_shape(*s, args.warmup, args.repeats) for s in shapes]
    print_table(rows)
    print(f"fwd+bwd of the local experts alone; median process CPU time of {args.repeats} alternating "
          f"repetitions; {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}")
    record("experts", {"shapes": rows, "load_average_1min": os.getloadavg()[0]}, out=args.json or None)
    return 0
