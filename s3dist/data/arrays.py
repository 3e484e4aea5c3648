"""`import-arrays`: bring your own multi-view data set as one .npy per modality plus a labels .npy.

Each modality array is [N, D] (one vector per sample) or [N, T, D] (a sequence; every step is real —
pad and mask in your own pipeline before if you need otherwise). Labels are [N] integer class ids
0..C-1, every id used (at least 2 classes; ids with gaps are refused with the one line that remaps them).
Files are read with `allow_pickle=False`. The split is a seeded stratified split (scikit-learn's
`train_test_split`): test first, then validation out of the rest.
"""

from __future__ import annotations

import os

import fsspec
import numpy as np
from sklearn.model_selection import train_test_split

from s3dist.config import ConfigError, absolute_local_path, check_safe_name
from s3dist.data import DataError
from s3dist.data.manifest import LabelSpec, Manifest
from s3dist.data.writer import SplitArrays, write_dataset


def _load(url: str, what: str) -> np.ndarray:
    try:
        with fsspec.open(url, "rb") as f:
            x = np.load(f, allow_pickle=False)
            names = x.files if not isinstance(x, np.ndarray) else None
    except FileNotFoundError as e:
        raise DataError(f"{what} file {url} not found") from e
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{what} file {url} is not a plain .npy array ({e}); save it with np.save "
                        f"(object arrays are refused)") from e
    if names is not None:  # an .npz archive: which of its arrays is meant is not ours to guess
        raise DataError(f"{what} file {url} is an .npz archive of {len(names)} arrays ({', '.join(names[:5])}); "
                        f"save the one array with np.save as its own .npy")
    return x


def _check_class_ids(y: np.ndarray, url: str) -> None:
    """Class ids must be 0..C-1 with every id used and C >= 2: the probe needs two classes, and an unused id
    would be a class no split holds (ids such as 5 and 1000000 would make a million-class head)."""
    if y.size == 0:
        raise DataError(f"labels file {url} holds no rows")
    if y.min() < 0:
        raise DataError(f"labels file {url} row {int(np.argmin(y))}: label {int(y.min())} is negative; "
                        f"class ids must be 0..C-1")
    present = np.unique(y)
    if present.size < 2:
        raise DataError(f"labels file {url} holds one class only ({int(present[0])}); a task needs at least 2")
    if present.size != int(present[-1]) + 1:
        missing = np.setdiff1d(np.arange(int(present[-1]) + 1), present)
        raise DataError(f"labels file {url} uses {present.size} distinct ids up to {int(present[-1])}, so "
                        f"{missing.size} ids are unused (e.g. {', '.join(map(str, missing[:5]))}); class ids must "
                        f"be 0..C-1. Remap them first: y = np.unique(y, return_inverse=True)[1]")


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded stratified train / val / test row indices."""
    idx = np.arange(len(labels))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_share, random_state=seed, stratify=labels[rest])
    except ValueError as e:  # too few samples of a class for a stratified split
        raise DataError(f"cannot make a stratified split of {len(labels)} samples with val fraction "
                        f"{val_fraction} and test fraction {test_fraction}: {e}") from e
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def import_arrays(modalities: dict[str, str], labels: str, out_url: str, *, val_fraction: float = 0.1,
                  test_fraction: float = 0.2, seed: int = 0, name: str | None = None, rows_per_shard: int = 1024,
                  overwrite: bool = False) -> Manifest:
    """Import {modality name: .npy URL} + labels .npy into a data set at `out_url`."""
    if not modalities:
        raise DataError("give at least one --modality NAME=FILE.npy")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in (0, 1) "
                        f"and sum to less than 1")
    for m in modalities:
        try:
            check_safe_name("modality name", m)
        except ConfigError as e:
            raise DataError(str(e)) from e
        if m.endswith("__mask") or m in ("id", "label", "label_raw", "concepts"):
            raise DataError(f"modality name {m!r} is reserved; choose another")
    y = _load(labels, "labels")
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if y.ndim == 1 and np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"labels file {labels} has shape {list(y.shape)} and dtype {y.dtype}; expected [N] "
                            f"integer class ids")
    y = y.astype(np.int64)
    _check_class_ids(y, labels)
    features = {}
    for m, url in modalities.items():
        x = _load(url, f"modality '{m}'")
        if x.ndim not in (2, 3) or x.shape[0] != y.shape[0]:
            raise DataError(f"modality '{m}' file {url} has shape {list(x.shape)}; expected [N, D] or [N, T, D] "
                            f"with N = {y.shape[0]} (the number of labels)")
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"modality '{m}' file {url} has dtype {x.dtype}; expected real numbers")
        if 0 in x.shape[1:]:
            raise DataError(f"modality '{m}' file {url} has shape {list(x.shape)}: every step and feature "
                            f"dimension must be at least 1")
        features[m] = x.astype(np.float32)
    num_classes = int(y.max()) + 1
    idx = split_indices(y, val_fraction, test_fraction, seed)
    splits = {s: SplitArrays(features={m: x[i] for m, x in features.items()}, labels=y[i], ids=i)
              for s, i in idx.items()}
    label = LabelSpec(kind="binary" if num_classes == 2 else "multiclass", num_classes=num_classes,
                      binarize="class ids as given in the labels file")
    name = name or os.path.basename(absolute_local_path(out_url).rstrip("/")) or "arrays"  # `--out .` too
    return write_dataset(out_url, name=name, splits=splits, label=label, rows_per_shard=rows_per_shard,
                         source=f"import-arrays: {', '.join(f'{m}={os.path.basename(u)}' for m, u in modalities.items())}; "
                                f"labels={os.path.basename(labels)}; stratified split seed {seed}",
                         overwrite=overwrite)
