"""The one place that writes a data set: splits of numpy arrays -> Parquet shards + manifest.

Used by the synthetic generator and by every importer. Writes are atomic: everything goes to a
hidden temporary sibling folder, the manifest last, and only a complete folder is moved to the
requested URL (local paths, `file://`, `memory://`, any fsspec filesystem). A failure on the way
removes the temporary folder, so an import never leaves a half-written data set behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from s3dist.config import ConfigError, check_safe_name
from s3dist.data import DataError
from s3dist.data.manifest import (
    MANIFEST_FILE,
    LabelSpec,
    Manifest,
    ModalitySpec,
    SplitSpec,
    dataset_fs,
)

ROW_GROUP_ROWS = 256  # the streaming reader yields one row group at a time: keep them batch-sized


@dataclass
class SplitArrays:
    """One split in memory. Features are [N, T, D] (sequence) or [N, D]; masks [N, T] bool."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    masks: dict[str, np.ndarray] | None = None      # default: every step real
    label_raw: np.ndarray | None = None
    ids: np.ndarray | None = None                   # default: a running index over all splits
    concepts: np.ndarray | None = None              # [N, K] uint8 (synthetic data only)

    def __len__(self) -> int:
        return len(self.labels)


def _fixed_list(values: np.ndarray, size: int, typ: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=typ)
    return pa.FixedSizeListArray.from_arrays(flat, size)


def _split_table(arr: SplitArrays, manifest: Manifest, ids: np.ndarray, split: str) -> pa.Table:
    """One split as a table with exactly the columns `Manifest.columns` describes (the description the
    stream checks and reads), plus `label_raw` where the importer kept the raw target."""
    n = len(arr)
    values = {"id": ids, "label": np.asarray(arr.labels).reshape(n), "concepts": arr.concepts}
    for m, spec in manifest.modalities.items():
        values[m] = arr.features[m]
        if spec.sequence:
            mask = (arr.masks or {}).get(m)
            values[f"{m}__mask"] = np.ones((n, spec.steps), bool) if mask is None else mask
    if arr.concepts is not None and not manifest.num_concepts:
        raise DataError(f"split '{split}' has concept columns but the data set declares no num_concepts")
    cols = {}
    for name, (dtype, size) in manifest.columns(list(manifest.modalities)).items():
        if values.get(name) is None:
            raise DataError(f"split '{split}' has no '{name}' values; the data set declares "
                            f"{manifest.num_concepts} concepts, so every split needs them")
        v = np.asarray(values[name], dtype=dtype)
        cols[name] = pa.array(v) if size is None else _fixed_list(v, size, pa.from_numpy_dtype(dtype))
        if name == "label" and arr.label_raw is not None:
            cols["label_raw"] = pa.array(np.asarray(arr.label_raw, dtype=np.float64).reshape(n))
    return pa.table(cols)


def _count_nonfinite(column: pa.ChunkedArray) -> int:
    """NaN / inf values in a written feature column (fixed-size list<float32>). Counted on what is
    written, not on the caller's arrays: a float64 value beyond float32's range becomes inf in the cast."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return int(np.count_nonzero(~np.isfinite(flat)))


def _check_splits(splits: dict[str, SplitArrays], label: LabelSpec) -> dict[str, ModalitySpec]:
    """Modality specs shared by every split; raise DataError on any disagreement."""
    first = next(iter(splits.values()))
    mods = {m: ModalitySpec(shape=list(a.shape[1:]), sequence=a.ndim == 3) for m, a in first.features.items()}
    for s, arr in splits.items():
        n = len(arr)
        if n == 0:
            raise DataError(f"split '{s}' is empty; every split needs at least one row")
        if set(arr.features) != set(mods):
            raise DataError(f"split '{s}' has modalities {sorted(arr.features)}, expected {sorted(mods)}")
        for m, a in arr.features.items():
            if list(a.shape) != [n, *mods[m].shape]:
                raise DataError(f"split '{s}' modality '{m}' has shape {list(a.shape)}, expected "
                                f"[{n}, {', '.join(map(str, mods[m].shape))}] (rows, then the shape of the "
                                f"first split)")
        for m, mask in (arr.masks or {}).items():
            if m not in mods or not mods[m].sequence or np.shape(mask) != (n, mods[m].steps):
                raise DataError(f"split '{s}' mask for '{m}' has shape {np.shape(mask)}; expected a [N, T] mask "
                                f"of a sequence modality")
        lab = np.asarray(arr.labels).reshape(-1)
        if lab.shape[0] != n:
            raise DataError(f"split '{s}' has {lab.shape[0]} labels for {n} rows")
        if label.kind != "regression":
            bad = np.flatnonzero((lab < 0) | (lab >= label.num_classes))
            if bad.size:
                raise DataError(f"split '{s}' row {bad[0]}: label {lab[bad[0]]} is outside the declared "
                                f"{label.num_classes} classes ({bad.size} such rows)")
    return mods


def write_dataset(out_url: str, *, name: str, splits: dict[str, SplitArrays], label: LabelSpec, source: str,
                  rows_per_shard: int = 1024, num_concepts: int | None = None,
                  concept_groups: dict[str, list[int]] | None = None, label_concepts: list[int] | None = None,
                  overwrite: bool = False) -> Manifest:
    """Write `splits` as a data set at `out_url` atomically and return its manifest. `concept_groups` and
    `label_concepts` (synthetic factors kind) go into the manifest as given."""
    try:
        check_safe_name("data set name", name)
    except ConfigError as e:
        raise DataError(str(e)) from e
    if rows_per_shard < 1:
        raise DataError(f"rows_per_shard = {rows_per_shard} must be >= 1")
    mods = _check_splits(splits, label)
    fs, root = dataset_fs(out_url)
    root = root.rstrip("/")
    _check_replaceable(fs, root, out_url, overwrite)
    parent, base = root.rsplit("/", 1) if "/" in root else ("", root)
    tmp = f"{parent}/.{base}.tmp-{uuid.uuid4().hex[:8]}" if parent else f".{base}.tmp-{uuid.uuid4().hex[:8]}"
    manifest = Manifest(name=name, modalities=mods, label=label, splits={}, num_concepts=num_concepts,
                        source=source, concept_groups=concept_groups, label_concepts=label_concepts)
    try:
        fs.makedirs(tmp, exist_ok=True)
        next_id = 0
        for s, arr in splits.items():
            n = len(arr)
            ids = np.arange(next_id, next_id + n) if arr.ids is None else np.asarray(arr.ids, np.int64)
            next_id += n
            table = _split_table(arr, manifest, ids, s)
            spec = SplitSpec(files=[], rows=n, nonfinite={})
            for i, start in enumerate(range(0, n, rows_per_shard)):
                fname = f"{s}-{i:05d}.parquet"
                shard = table.slice(start, rows_per_shard)
                counts = {m: _count_nonfinite(shard.column(m)) for m in mods}
                if any(counts.values()):
                    spec.nonfinite[fname] = {m: c for m, c in counts.items() if c}
                buf = io.BytesIO()
                pq.write_table(shard, buf, row_group_size=ROW_GROUP_ROWS)
                data = buf.getvalue()
                with fs.open(f"{tmp}/{fname}", "wb") as f:
                    f.write(data)
                spec.files.append(fname)
                spec.checksums[fname] = hashlib.sha256(data).hexdigest()
                spec.file_rows[fname] = min(rows_per_shard, n - start)
            manifest.splits[s] = spec
        all_ids = np.concatenate([np.asarray(a.ids if a.ids is not None else [], np.int64) for a in splits.values()])
        if all_ids.size and np.unique(all_ids).size != all_ids.size:
            raise DataError(f"data set '{name}': ids are not unique across splits")
        with fs.open(f"{tmp}/{MANIFEST_FILE}", "wb") as f:  # last: its presence marks a complete folder
            f.write(manifest.to_json().encode())
        _publish(fs, tmp, root)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        raise
    return manifest


def _check_replaceable(fs, root: str, out_url: str, overwrite: bool) -> None:
    """Refuse an existing `--out` unless `overwrite` is given and it holds an s3dist data set (or nothing):
    `--overwrite` deletes the old folder, so it must never take a folder of the user's own files with it."""
    if not fs.exists(root):
        return
    if not overwrite:
        raise DataError(f"output '{out_url}' already exists; pass --overwrite to replace the data set there, or "
                        f"choose another --out")
    if not fs.isdir(root):
        raise DataError(f"output '{out_url}' is a file, not a data-set folder; --overwrite replaces only an s3dist "
                        f"data set, so nothing was deleted. Choose another --out")
    if fs.ls(root, detail=False) and not fs.exists(f"{root}/{MANIFEST_FILE}"):
        raise DataError(f"output '{out_url}' exists and is not an s3dist data set (it has no {MANIFEST_FILE}); "
                        f"--overwrite replaces only a data set, so nothing was deleted. Choose another --out, or "
                        f"empty that folder yourself")
    if _is_local(fs):
        here, target = os.path.realpath(os.getcwd()), os.path.realpath(root)
        if here == target or here.startswith(target + os.sep):
            raise DataError(f"output '{out_url}' is the current directory or holds it; replacing it would pull the "
                            f"folder out from under this shell. Run the command from another directory")


def _is_local(fs) -> bool:
    return getattr(fs, "protocol", None) in ("file", ("file", "local")) or type(fs).__name__ == "LocalFileSystem"


def _publish(fs, tmp: str, root: str) -> None:
    """Move the finished temporary folder to `root`, replacing an old data set only after success."""
    old = None
    if fs.exists(root):
        old = f"{tmp}.old"
        _move(fs, root, old)
    _move(fs, tmp, root)
    if old is not None:
        fs.rm(old, recursive=True)


def _move(fs, src: str, dst: str) -> None:
    if _is_local(fs):
        os.replace(src, dst)  # atomic rename on one filesystem
    else:
        fs.mv(src, dst, recursive=True)
