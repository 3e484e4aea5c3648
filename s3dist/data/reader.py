"""Reading one partition of a split through `datasets` streaming, with parallel shard decoders.

A partition is what `split_dataset_by_node(rank=part, world_size=parts)` hands one node of `parts`:
whole shards part, part + parts, ... of the epoch's shard list when their count divides `parts`, else
every parts-th row. `ShardStream` gives each rank one or more partitions (see its docstring); this
module only reads them, as Arrow tables in the order one `datasets` reader would give.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from s3dist.data.readahead import Prefetcher
from s3dist.data.validate import column_numpy
from s3dist.data.writer import ROW_GROUP_ROWS

# load_dataset's file resolution is serialised: see `PartitionReader._read`.
_OPEN_LOCK = threading.Lock()
_READER_DEPTH = 4  # blocks (row groups) a parallel reader decodes ahead: a default 1024-row shard


class PartitionReader:
    """Reads partitions of one split: `fs`/`root` locate the shards, `file_rows` holds each shard's
    verified row count, `columns` the columns in use (`Manifest.columns`)."""

    def __init__(self, split: str, fs, root: str, columns: dict[str, tuple[np.dtype, int | None]],
                 file_rows: dict[str, int]):
        self.split, self._fs, self._root = split, fs, root
        self.columns, self.file_rows = columns, file_rows

    @staticmethod
    def whole_shards(n_files: int, parts: int) -> bool:
        """Does `split_dataset_by_node` hand out whole shards (else every parts-th row)?"""
        return n_files % parts == 0

    def blocks(self, files: list[str], part: int, parts: int, readers: int) -> Iterator[dict[str, np.ndarray]]:
        """Partition `part` of `parts` of `files` (the epoch's shard order) as numpy column blocks."""
        for t in self.tables(files, part, parts, readers):
            if t.num_rows:
                yield {col: column_numpy(t.column(col)) for col in self.columns}

    def tables(self, files: list[str], part: int, parts: int, readers: int) -> Iterator[pa.Table]:
        """Partition `part` of `files` as Arrow tables, decoded by up to `readers` threads.

        With k > 1 reader threads the row sequence is exactly that of one reader. `split_dataset_by_node`
        gives node p shards p, p + P, p + 2P, ... of the list, so the list is cut into groups of P
        consecutive shards, reader i gets groups i, i + k, ... (each its own `load_dataset` +
        `split_dataset_by_node`, which picks shard p of every group), and the merge takes each shard's rows
        from its reader in the original group order. Each reader decodes up to `_READER_DEPTH` blocks
        ahead, so while one shard is consumed the next ones are being decoded on other cores (Arrow
        releases the GIL). Why: decoding is the stream's main cost and Arrow decodes a row group's
        columns in parallel only as far as the columns allow (one wide modality dominates), so a single
        reader leaves cores idle. `readers` > 1 needs whole shards and at most one reader per shard of the
        partition (the caller, `ShardStream._readers`, decides it so)."""
        k = readers
        if k <= 1:
            yield from self._read(files, part, parts)
            return
        groups = [files[g:g + parts] for g in range(0, len(files), parts)]
        threads = [Prefetcher(self._read([f for group in groups[i::k] for f in group], part, parts), _READER_DEPTH)
                   for i in range(k)]
        try:
            rows = [_RowTaker(iter(r)) for r in threads]
            for g, group in enumerate(groups):
                yield from rows[g % k].take(self.file_rows[group[part]], group[part])
        finally:
            for r in threads:
                r.close()

    def _read(self, files: list[str], part: int, parts: int) -> Iterator[pa.Table]:
        """`files` (shard names, in order) through `datasets` streaming, split for node `part`."""
        import datasets
        from datasets import Features, List, Value, load_dataset
        from datasets.distributed import split_dataset_by_node

        # load_dataset otherwise pings the Hub to count downloads of the "parquet" builder (3 s timeout
        # per call, i.e. per epoch, on machines without network).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

        fs = self._fs
        local = type(fs).__name__ == "LocalFileSystem"
        urls = [f"{self._root}/{f}" if local else fs.unstrip_protocol(f"{self._root}/{f}") for f in files]
        feats = {c: Value(str(dtype)) if size is None else List(Value(str(dtype)), length=size)
                 for c, (dtype, size) in self.columns.items()}
        # One at a time: parallel readers (and the next epoch's) open their parts concurrently, and
        # load_dataset's file resolution runs tqdm's thread_map, whose class-level lock set-up is not
        # thread-safe (AttributeError: type object 'tqdm' has no attribute '_lock'). Only the opening is
        # serialised; the decoding below runs in parallel.
        with _OPEN_LOCK:
            ds = load_dataset("parquet", data_files={self.split: urls}, split=self.split, streaming=True,
                              columns=list(self.columns), features=Features(feats))
            if parts > 1:
                ds = split_dataset_by_node(ds, rank=part, world_size=parts)
        # Blocks of whole row groups whatever the batch size: the shuffle and the re-batching take any
        # block size, so cutting here into batch-sized slices would only add per-block overhead (and
        # make `_READER_DEPTH` blocks a shorter read-ahead).
        yield from ds.with_format("arrow").iter(batch_size=ROW_GROUP_ROWS)


class _RowTaker:
    """Cuts a reader's stream of tables at given row counts (its shards' ends), carrying the rest over."""

    def __init__(self, tables: Iterator[pa.Table]):
        self._tables, self._rest = tables, None

    def take(self, n: int, where: str) -> Iterator[pa.Table]:
        while n > 0:
            t, self._rest = self._rest, None
            if t is None:
                t = next(self._tables, None)
                if t is None:
                    raise RuntimeError(f"the reader of {where} ended {n} rows early; this is a bug in ShardStream")
            if t.num_rows > n:
                t, self._rest = t.slice(0, n), t.slice(n)
            n -= t.num_rows
            yield t
