"""The `s3dist` console script: one entry point, one subcommand group per module.

Each group lives in the module that owns the concern and exposes `add_subcommands(subparsers)`;
this file only wires them up, so adding a group never touches another group's code. How every command
ends on an error is decided here once (`s3dist.exits`), not per group.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from s3dist import exits

# (subcommand, module that implements it, one-line help)
_GROUPS = [
    ("data", "s3dist.data.cli", "import, synthesise and inspect data sets"),
    ("eval", "s3dist.eval_cli", "linear-probe evaluation of a run or an exported model"),
    ("sweep", "s3dist.eval_cli", "sparsity sweep over keep fractions (one run or several seeds)"),
    ("export", "s3dist.export", "write a run's encoder as a folder from_pretrained loads (or one .safetensors)"),
    ("embed", "s3dist.embed", "embeddings of a data split from a trained encoder, as one Parquet file"),
    ("bench", "s3dist.bench.cli", "benchmarks: data, moe, experts, train, plan"),
    ("config", "s3dist.config_cli", "print the config reference or validate a recipe"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s3dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser("train", help="run training in this process (use `accelerate launch -m s3dist.train` "
                                         "for several processes)", add_help=False)
    train.set_defaults(func=_run_train)
    for name, module, help_text in _GROUPS:
        importlib.import_module(module).add_subcommands(sub, name, help_text)
    return parser


def _run_train(args: argparse.Namespace, rest: list[str]) -> int:
    from s3dist import train
    return train.main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "train":  # train parses its own arguments (shared with `-m s3dist.train`)
        return _run_train(argparse.Namespace(), argv[1:])
    args = parser.parse_args(argv)
    return exits.run(args.func, args, prog=f"s3dist {args.command}")


if __name__ == "__main__":
    sys.exit(main())
