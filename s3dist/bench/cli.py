"""`s3dist bench ...`: one subcommand per benchmark module.

Each benchmark lives in `s3dist/bench/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported lazily here; one that does not exist yet is skipped, so
adding a benchmark never touches this file or another benchmark's code.
"""

from __future__ import annotations

import importlib

# (subcommand, module, one-line help)
BENCHMARKS = [
    ("data", "s3dist.bench.data", "samples/s of the training stream vs plain pyarrow, same shards"),
    ("moe", "s3dist.bench.moe", "MoE layer throughput"),
    ("experts", "s3dist.bench.experts", "local experts: per-expert loop vs grouped GEMMs"),
    ("train", "s3dist.bench.train", "end-to-end training throughput"),
    ("plan", "s3dist.bench.plan", "parallel layout planning"),
]


def add_subcommands(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for cmd, module, cmd_help in BENCHMARKS:
        mod = importlib.import_module(module)
        # the module docstring's first paragraph, whole: its first line alone can stop mid-sentence
        summary = " ".join((mod.__doc__ or cmd_help).split("\n\n")[0].split())
        bp = sub.add_parser(cmd, help=cmd_help, description=summary)
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.run)
