"""`s3dist bench ...`: one subcommand per benchmark module.

Each benchmark lives in `s3dist/bench/<name>.py` and exposes `add_arguments(parser)` and
`run(args) -> int`; adding one is a line in BENCHMARKS. Every benchmark takes `--json FILE` (its record:
command, versions, machine, figures), checked here before the benchmark runs, so a typed-wrong path costs
no minutes of timing and an existing file that is not a benchmark record is left alone.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

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
        bp.add_argument("--json", default="", help="write the record (command, versions, machine, figures) here; "
                                                    "an earlier record there is replaced, any other file refused")
        bp.set_defaults(func=functools.partial(_run, mod.run))


def _run(run, args) -> int:
    if args.json:
        from s3dist.outputs import check_output_file

        check_output_file(Path(args.json), "--json", ours=_is_record, kind="an s3dist benchmark record",
                          example="bench.json")
    return run(args)


def _is_record(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and {"benchmark", "figures"} <= doc.keys()
