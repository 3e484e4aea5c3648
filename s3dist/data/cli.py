"""`s3dist data ...`: import, synthesise and inspect data sets.

Every subcommand returns an exit code; bad input prints the error (naming file, key or row) to
stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys

from s3dist.config import ConfigError


def add_subcommands(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    mb = sub.add_parser("import-multibench", help="import a MultiBench benchmark from its original files")
    from s3dist.data.multibench import BENCHMARKS
    mb.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    mb.add_argument("--source", required=True, help="the MultiBench file (affect .pkl, im.pk) or folder (avmnist)")
    mb.add_argument("--out", required=True, help="URL of the data-set folder to create")
    mb.add_argument("--task", type=int, default=-1, help="mimic only: -1 mortality (6 classes) or ICD-9 group 0..19")
    mb.add_argument("--rows-per-shard", type=int, default=1024)
    mb.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")
    mb.set_defaults(func=_guarded(_import_multibench))

    ar = sub.add_parser("import-arrays", help="import your own data: one .npy per modality plus labels")
    ar.add_argument("--modality", action="append", default=[], metavar="NAME=FILE.npy", required=True)
    ar.add_argument("--labels", required=True, metavar="FILE.npy")
    ar.add_argument("--out", required=True)
    ar.add_argument("--val-fraction", type=float, default=0.1)
    ar.add_argument("--test-fraction", type=float, default=0.2)
    ar.add_argument("--seed", type=int, default=0)
    ar.add_argument("--name", default=None, help="data-set name (default: the last part of --out)")
    ar.add_argument("--rows-per-shard", type=int, default=1024)
    ar.add_argument("--overwrite", action="store_true")
    ar.set_defaults(func=_guarded(_import_arrays))

    sy = sub.add_parser("synth", help="generate the synthetic concept-structured data set")
    sy.add_argument("--out", required=True)
    sy.add_argument("--name", default="synth")
    sy.add_argument("--overwrite", action="store_true")
    sy.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="SynthConfig fields, e.g. num_concepts=8 seq_len=32 (data.synth.* also accepted)")
    sy.set_defaults(func=_guarded(_synth))

    ins = sub.add_parser("inspect", help="print a data set's manifest, split sizes and label balance")
    ins.add_argument("url")
    ins.set_defaults(func=_guarded(_inspect))


def _guarded(fn):
    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from s3dist.data import DataError
        try:
            return fn(args)
        except (DataError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


def _report(out: str, m) -> None:
    print(f"wrote {out}: " + ", ".join(f"{s} {sp.rows} rows" for s, sp in m.splits.items()))
    for s, spec in m.splits.items():
        for name, c in (spec.nonfinite_totals() or {}).items():
            print(f"warning: split '{s}' modality '{name}' holds {c} NaN/inf values; training stops on them "
                  f"unless data.nonfinite=zero (replace with 0)", file=sys.stderr)


def _import_multibench(args) -> int:
    from s3dist.data.multibench import import_multibench
    m = import_multibench(args.benchmark, args.source, args.out, task=args.task, rows_per_shard=args.rows_per_shard,
                          overwrite=args.overwrite)
    _report(args.out, m)
    return 0


def _import_arrays(args) -> int:
    from s3dist.data import DataError
    from s3dist.data.arrays import import_arrays
    mods = {}
    for item in args.modality:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DataError(f"--modality {item!r} is not NAME=FILE.npy")
        mods[name] = path
    m = import_arrays(mods, args.labels, args.out, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                      seed=args.seed, name=args.name, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite)
    _report(args.out, m)
    return 0


def synth_config(overrides: list[str]):
    """SynthConfig from `key=value` strings, validated by the run-config machinery."""
    from s3dist.config import load_config, parse_overrides
    dotted = {(k if k.startswith("data.synth.") else f"data.synth.{k}"): v
              for k, v in parse_overrides(overrides).items()}
    return load_config(overrides=dotted).data.synth


def _synth(args) -> int:
    from s3dist.data.synth import generate
    cfg = synth_config(args.overrides)
    m = generate(args.out, cfg, name=args.name, overwrite=args.overwrite)
    _report(args.out, m)
    return 0


def _inspect(args) -> int:
    import numpy as np
    import pyarrow.parquet as pq

    from s3dist.data.manifest import dataset_fs, read_manifest
    m = read_manifest(args.url)
    print(f"data set   {m.name}")
    print(f"source     {m.source}")
    print(f"label      {m.label.kind}, {m.label.num_classes} classes ({m.label.binarize})")
    if m.num_concepts:
        print(f"concepts   {m.num_concepts}")
    print("modalities")
    for name, spec in m.modalities.items():
        print(f"  {name:<12} shape {spec.shape} {spec.dtype} {'sequence' if spec.sequence else 'vector'}")
    fs, root = dataset_fs(args.url)
    print(f"{'split':<8} {'rows':>8} {'shards':>6}  label balance")
    for s, spec in m.splits.items():
        counts = np.zeros(max(m.label.num_classes, 1), np.int64)
        for f in spec.files:
            with fs.open(f"{root}/{f}", "rb") as fh:
                labels = pq.read_table(fh, columns=["label"]).column("label").to_numpy()
            counts += np.bincount(labels.clip(0), minlength=len(counts))[: len(counts)]
        total = max(int(counts.sum()), 1)
        balance = " ".join(f"{c}:{n} ({100 * n / total:.1f}%)" for c, n in enumerate(counts))
        print(f"{s:<8} {spec.rows:>8} {len(spec.files):>6}  {balance}")
    for s, spec in m.splits.items():
        totals = spec.nonfinite_totals()
        if totals is None:
            print(f"NaN/inf    {s}: not counted (older manifest; checked per batch while streaming)")
        elif totals:
            print(f"NaN/inf    {s}: " + ", ".join(f"{name} {c}" for name, c in totals.items()))
    return 0


__all__ = ["add_subcommands", "synth_config"]
