"""Checks a split's shards before streaming them: checksum, Parquet footer, columns, labels, NaN / inf.

Every shard of the split is read once to verify its sha256 against the manifest, parse its footer,
check its columns against the manifest and its labels against the declared classes; NaN / inf values
the manifest records in a modality in use stop here (nonfinite='error'). That is one sequential read of
the split per rank per open (about a second per GB). Every error names the file and what to do.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from s3dist.data import DataError
from s3dist.data.manifest import Manifest, SplitSpec


def column_numpy(chunked: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: [n] for scalars, [n, size] for fixed-size lists (zero-copy where Arrow's
    layout allows: one chunk, not bool)."""
    arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


SHOWN_IDS = 5  # row ids an error names; one more is looked up to know whether there are more


def nonfinite_error(url: str, split: str, name: str, count: int, ids: list[int], where: str = "") -> DataError:
    """The error for `count` NaN / inf values in a modality, found from the manifest's counts or in a batch;
    `ids`: the rows holding them (up to SHOWN_IDS + 1)."""
    return DataError(f"{url} split '{split}': {count} NaN/inf values in modality '{name}' (rows with id "
                     f"{ids[:SHOWN_IDS]}{'...' if len(ids) > SHOWN_IDS else ''}{where}); fix the data or set "
                     f"data.nonfinite=zero to replace them with 0")


class SplitCheck:
    """The checks of one split for the modalities in use; `fs` and `root` locate the shards."""

    def __init__(self, url: str, split: str, manifest: Manifest, fs, root: str, modalities: list[str]):
        self.url, self.split, self.manifest = url, split, manifest
        self._spec: SplitSpec = manifest.splits[split]
        self._fs, self._root, self.modalities = fs, root, modalities
        self.columns = manifest.columns(modalities)

    def file_rows(self) -> dict[str, int]:
        """Every shard verified; its row count, in the manifest's order."""
        rows = {f: self.verify_file(f) for f in self._spec.files}
        if sum(rows.values()) != self._spec.rows:
            raise DataError(f"{self.url}/manifest.json: split '{self.split}' declares {self._spec.rows} rows but its "
                            f"shards hold {sum(rows.values())}; re-create the data set")
        return rows

    def verify_file(self, fname: str) -> int:
        path = f"{self._root}/{fname}"
        where = f"{self.url}/{fname}"
        try:
            with self._fs.open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError as e:
            raise DataError(f"{where} (split '{self.split}') is missing; the data set is incomplete, re-create "
                            f"or re-copy it") from e
        except OSError as e:
            raise DataError(f"{where} cannot be read: {e}") from e
        want = self._spec.checksums.get(fname)
        if want is None:
            raise DataError(f"{self.url}/manifest.json has no checksum for '{fname}'; re-create the data set")
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise DataError(f"{where}: checksum mismatch (sha256 {got[:12]}..., manifest says {want[:12]}...); "
                            f"the file changed or is damaged, re-copy or re-create the data set")
        try:
            pf = pq.ParquetFile(io.BytesIO(data))
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where} is not a readable Parquet file ({e}); re-create the data set") from e
        self.check_schema(where, schema)
        declared = self._spec.file_rows.get(fname)
        rows = pf.metadata.num_rows
        if declared is not None and declared != rows:
            raise DataError(f"{where} holds {rows} rows, manifest says {declared}; re-create the data set")
        lab = self.manifest.label
        if lab.kind != "regression":
            try:
                t = pf.read(columns=["id", "label"])
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{where} is not a readable Parquet file ({e}); re-create the data set") from e
            labels = t.column("label").to_numpy()
            bad = np.flatnonzero((labels < 0) | (labels >= lab.num_classes))
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{where} row {i} (id {t.column('id')[i].as_py()}): label {labels[i]} is outside "
                                f"the declared {lab.num_classes} classes 0..{lab.num_classes - 1} ({bad.size} such "
                                f"rows); fix the labels or the manifest's label.num_classes")
        return rows

    def nonfinite_to_check(self, nonfinite: str) -> set[str]:
        """The modalities whose batches are checked for NaN / inf while streaming; stops here when the
        manifest records such values in a modality in use and nonfinite='error'.

        The writer counts non-finite values per shard and modality, and the checksums verified above
        guarantee the shards are the ones it counted, so a count of zero needs no check per batch (it
        costs ~5% of the stream's CPU time on MOSI-shaped rows) and a count above zero can stop the run
        now rather than when training reaches that row. Manifests without counts are checked per batch."""
        totals = self._spec.nonfinite_totals()
        if totals is None:
            return set(self.modalities)
        bad = {m: totals[m] for m in self.modalities if m in totals}
        if bad and nonfinite == "error":
            name, total = next(iter(bad.items()))
            files = [f for f in self._spec.files if self._spec.nonfinite.get(f, {}).get(name)]
            ids = self.nonfinite_ids(files[0], name)
            more = f" and {len(files) - 1} more shard{'s' if len(files) > 2 else ''}" if len(files) > 1 else ""
            raise nonfinite_error(self.url, self.split, name, total, ids, f" in {files[0]}{more}")
        return set(bad)

    def nonfinite_ids(self, fname: str, name: str, limit: int = SHOWN_IDS + 1) -> list[int]:
        with self._fs.open(f"{self._root}/{fname}", "rb") as f:
            t = pq.read_table(f, columns=["id", name])
        rows = np.flatnonzero(~np.isfinite(column_numpy(t.column(name))).all(axis=1))[:limit]
        return t.column("id").to_numpy()[rows].tolist()

    def check_schema(self, where: str, schema: pa.Schema) -> None:
        m = self.manifest
        for col, (dtype, size) in self.columns.items():
            typ = pa.from_numpy_dtype(dtype)
            idx = schema.get_field_index(col)
            if idx < 0:
                raise DataError(f"{where} has no column '{col}' that the manifest declares; re-create the data set")
            t = schema.field(idx).type
            if size is None:
                ok = t == typ
                want = str(typ)
            else:
                ok = pa.types.is_fixed_size_list(t) and t.value_type == typ and t.list_size == size
                want = f"fixed_size_list<{typ}>[{size}]"
            if not ok:
                shape = m.modalities[col].shape if col in m.modalities else None
                hint = f" (manifest shape {shape})" if shape else ""
                raise DataError(f"{where}: column '{col}' is {t}, expected {want}{hint}; the shard disagrees with "
                                f"the manifest, re-create the data set")


def check_eval_splits(url: str, manifest: Manifest, modalities: list[str], nonfinite: str) -> None:
    """The val and test splits a run's final evaluation reads, checked when training starts with the stream's
    own checks (presence, checksums, columns, labels, NaN / inf), so a damaged shard there stops the run before
    training rather than after it. Also refuses a classification task of fewer than 2 classes (a probe needs 2)."""
    from s3dist.data.manifest import dataset_fs

    lab = manifest.label
    if lab.kind != "regression" and lab.num_classes < 2:
        raise DataError(f"{url}/manifest.json declares {lab.num_classes} class; a linear probe needs at least 2. "
                        f"Re-create the data set with labels of 2 or more classes")
    fs, root = dataset_fs(url)
    for split in ("val", "test"):
        if split not in manifest.splits:
            raise DataError(f"{url}/manifest.json has no '{split}' split, which the final evaluation reads (the "
                            f"probe's C is chosen on val, accuracy measured on test); re-create the data set, or "
                            f"set eval.run_at_end=false")
        if manifest.splits[split].rows <= 0 or not manifest.splits[split].files:
            raise DataError(f"{url}/manifest.json: split '{split}' is empty (0 rows), and the final evaluation reads "
                            f"it (the probe's C is chosen on val, accuracy measured on test); re-create the data set "
                            f"with rows in it, or set eval.run_at_end=false")
        check = SplitCheck(url, split, manifest, fs, root, modalities)
        check.file_rows()
        check.nonfinite_to_check(nonfinite)
