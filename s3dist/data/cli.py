"""`s3dist data ...`: import, synthesise and inspect data sets.

Every subcommand returns an exit code; bad input prints the error (naming file, key or row) to
stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import sys

_OUT_HELP = "URL of the data-set folder to create"
_ROWS_HELP = "rows per Parquet shard (default 1024)"
_OVERWRITE_HELP = "replace an s3dist data set (or an empty folder) at --out; any other folder is refused"


def add_subcommands(subparsers, name: str, help_text: str) -> None:
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")

    mb = sub.add_parser("import-multibench", help="import a MultiBench benchmark from its original files")
    from s3dist.data.multibench import BENCHMARKS
    mb.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    mb.add_argument("--source", required=True, help="the MultiBench file (affect .pkl, im.pk) or folder (avmnist)")
    mb.add_argument("--out", required=True, help=_OUT_HELP)
    mb.add_argument("--task", type=int, default=-1, help="mimic only: -1 mortality (6 classes) or ICD-9 group 0..19")
    mb.add_argument("--rows-per-shard", type=int, default=1024, help=_ROWS_HELP)
    mb.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    mb.set_defaults(func=_import_multibench)

    ar = sub.add_parser("import-arrays", help="import your own data: one .npy per modality plus labels")
    ar.add_argument("--modality", action="append", default=[], metavar="NAME=FILE.npy", required=True,
                    help="one modality: an [N, D] or [N, T, D] array, row i of every file the same sample; give "
                         "the option once per modality (any fsspec URL)")
    ar.add_argument("--labels", required=True, metavar="FILE.npy", help="[N] integer class ids 0..C-1, each used")
    ar.add_argument("--out", required=True, help=_OUT_HELP)
    ar.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of the rows held out for validation (stratified by label; default 0.1)")
    ar.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of the rows held out for test (stratified by label; default 0.2)")
    ar.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    ar.add_argument("--name", default=None, help="data-set name (default: the last part of --out)")
    ar.add_argument("--rows-per-shard", type=int, default=1024, help=_ROWS_HELP)
    ar.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    ar.set_defaults(func=_import_arrays)

    sy = sub.add_parser("synth", help="generate a synthetic data set (kind=concepts, the default, or kind=factors: "
                                      "shared / unique / nuisance factors)")
    sy.add_argument("--out", required=True, help=_OUT_HELP)
    sy.add_argument("--name", default="synth", help="data-set name recorded in its manifest (default synth)")
    sy.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    sy.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="SynthConfig fields, e.g. num_concepts=8 seq_len=32, or kind=factors "
                         "label_mode=shared (data.synth.* also accepted)")
    sy.set_defaults(func=_synth)

    ins = sub.add_parser("inspect", help="print a data set's manifest, split sizes and label balance")
    ins.add_argument("url")
    ins.add_argument("--verify", action="store_true",
                     help="first check every shard's sha256 against the manifest (exit 2 listing the bad ones), "
                          "then what training checks: columns and shapes, row counts, labels within the classes")
    ins.set_defaults(func=_inspect)


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
        if name in mods:
            raise DataError(f"--modality {name!r} is given twice ({mods[name]} and {path}); give each name once")
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


def _index_ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _shard_problem(fs, root: str, f: str, expected: str | None) -> tuple[bytes | None, str | None]:
    """(shard bytes, None) or (bytes or None, what is wrong) from comparing the shard with its manifest sha256."""
    import hashlib
    try:
        with fs.open(f"{root}/{f}", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None, "missing"
    if expected is None:
        return data, None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        return data, f"sha256 {got[:12]}... does not match the manifest's {expected[:12]}... ({len(data)} bytes)"
    return data, None


def _verify(url: str, m) -> tuple[int, int]:
    """Check every shard against the manifest; raise DataError listing the bad ones. Returns (shards checked,
    shards the manifest holds no checksum for)."""
    from s3dist.data import DataError
    from s3dist.data.manifest import dataset_fs
    fs, root = dataset_fs(url)
    bad, checked, unchecked = [], 0, 0
    for s, spec in m.splits.items():
        for f in spec.files:
            _, problem = _shard_problem(fs, root, f, spec.checksums.get(f))
            checked += f in spec.checksums
            unchecked += f not in spec.checksums
            if problem:
                bad.append(f"  {f} (split '{s}'): {problem}")
    if bad:
        raise DataError(f"{len(bad)} of the shards of {url} do not match its manifest:\n" + "\n".join(bad)
                        + "\nthey were truncated or changed after writing: copy them again from where the data set "
                          "came from, or re-create it (s3dist data import-... / synth --overwrite)")
    # the shards are the ones written: now what training checks of them against the manifest (columns and
    # shapes, row counts, labels within the declared classes), so a data set that passes here also streams
    from s3dist.data.validate import SplitCheck

    for s in m.splits:
        SplitCheck(url, s, m, fs, root, list(m.modalities)).file_rows()
    return checked, unchecked


def _read_labels(fs, root: str, url: str, s: str, f: str, spec):
    """The label column of one shard. A shard that cannot be read is checked against its manifest sha256, so
    the error says whether the file changed after it was written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s3dist.data import DataError
    data, problem = _shard_problem(fs, root, f, spec.checksums.get(f))
    if data is None:
        raise DataError(f"shard {url.rstrip('/')}/{f} of split '{s}' is listed in the manifest but missing; copy the "
                        f"data set again or re-create it")
    try:  # parse from memory: pyarrow reading a Python file object can abort the interpreter at exit
        return pq.read_table(pa.BufferReader(data), columns=["label"]).column("label").to_numpy()
    except (pa.ArrowException, OSError) as e:
        if problem:
            why = f"its {problem}: the file was truncated or changed after it was written"
        elif f in spec.checksums:
            why = "its sha256 matches the manifest, so it was written this way"
        else:
            why = "the manifest holds no checksum for it"
        raise DataError(f"shard {url.rstrip('/')}/{f} of split '{s}' cannot be read ({e}); {why}. Copy it again from "
                        f"where the data set came from or re-create the data set; `s3dist data inspect --verify "
                        f"{url}` lists every bad shard") from e


def _inspect(args) -> int:
    import numpy as np

    from s3dist.data.manifest import dataset_fs, read_manifest
    m = read_manifest(args.url)
    checked = _verify(args.url, m) if args.verify else None
    print(f"data set   {m.name}")
    print(f"source     {m.source}")
    print(f"label      {m.label.kind}, {m.label.num_classes} classes ({m.label.binarize})")
    if m.num_concepts:
        print(f"concepts   {m.num_concepts}" + (" (sign bits of the generating factors)" if m.concept_groups else ""))
    for group, idx in (m.concept_groups or {}).items():
        print(f"  {group:<18} {_index_ranges(idx)}")
    if m.label_concepts is not None:
        print(f"  {'label built from':<18} {m.label_concepts}")
    print("modalities")
    for name, spec in m.modalities.items():
        print(f"  {name:<12} shape {spec.shape} {spec.dtype} {'sequence' if spec.sequence else 'vector'}")
    fs, root = dataset_fs(args.url)
    print(f"{'split':<8} {'rows':>8} {'shards':>6}  label balance")
    for s, spec in m.splits.items():
        counts = np.zeros(max(m.label.num_classes, 1), np.int64)
        for f in spec.files:
            labels = _read_labels(fs, root, args.url, s, f, spec)
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
    if checked is not None:
        print(f"verified   {checked[0]} shards: sha256 matches the manifest"
              + (f"; {checked[1]} have no checksum in the manifest (not checked)" if checked[1] else ""))
    return 0


__all__ = ["add_subcommands", "synth_config"]
