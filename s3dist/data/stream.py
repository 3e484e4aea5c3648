"""`ShardStream`: one data-parallel rank's resumable stream of ready torch batches from a data set.

Pipeline per epoch (everything batch-wise, no per-row Python):

1. shard order: with shuffling on, the split's shard files are permuted by a generator seeded with
   (seed, epoch), identically on every rank;
2. `datasets.load_dataset("parquet", streaming=True)` + `split_dataset_by_node` give this rank its part
   (whole shards when their count divides the world size, else every world_size-th row);
3. a shuffle buffer of `shuffle_buffer` rows, seeded with (seed, epoch, rank), holds (block, row)
   references into the decoded numpy column blocks: each incoming row takes a random buffer slot and
   evicts the row that was there; each batch of evicted rows is gathered with one copy;
4. rows are cut into batches, validated (NaN / inf) and handed out as torch tensors.

Exactly-once resume. `datasets` does not restore its shuffle buffer from `IterableDataset.state_dict`,
so the stream's state is only (epoch, batches handed out). Every step above is a deterministic
function of (seed, epoch, rank, world_size), so `load_state_dict` + `__iter__` replays the epoch from its
start and discards the first n batches before handing out batch n + 1. Cost: re-reading and
re-shuffling n batches' rows (no torch conversion or checks); at our sizes that is well under a
second per thousand batches of MOSI-shaped rows, paid once per restart.

Equal batch counts without collectives. `batches_per_epoch` is derived from manifest row counts only:
with `drop_last=True` every rank hands out floor(min_rows / B) full batches, where min_rows is the
fewest rows any rank can be given (whole-shard split: the k smallest shards; row split: total //
world); a rank's surplus rows of that epoch are dropped, as a last partial batch would be. With
`drop_last=False` (evaluation) every rank hands out ceil(max_rows / B) batches covering all its rows
once, then empty (B = 0) batches, so no rank waits alone in a collective.

Checks when the stream opens: every shard of the split is read once to verify its sha256, parse its
Parquet footer, check its columns against the manifest and its labels against the declared classes.
That is one sequential read of the split per rank per open (about a second per GB); the stream then
reads the shards again while iterating.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from s3dist.data import DataError
from s3dist.data.manifest import Manifest, dataset_fs, read_manifest

_STATE_KEYS = ("epoch", "batches_done", "seed", "rank", "world_size", "batch_size", "shuffle_buffer", "split",
               "drop_last")


@dataclass
class Batch:
    ids: torch.Tensor                   # int64 [B]
    labels: torch.Tensor                # int64 [B]
    features: dict[str, torch.Tensor]   # float32 [B, T, D]; a [D] modality gets T = 1
    masks: dict[str, torch.Tensor]      # bool [B, T], True = real step
    concepts: torch.Tensor | None       # uint8 [B, K] (synthetic data only)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class ShardStream:
    """This rank's batches of one split of a data set; see the module docstring for the design."""

    def __init__(self, url: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 modalities: list[str] | None = None, seed: int = 0, shuffle_buffer: int = 0,
                 drop_last: bool = True, nonfinite: str = "error"):
        if batch_size < 1:
            raise DataError(f"batch_size = {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if nonfinite not in ("error", "zero"):
            raise DataError(f"nonfinite = {nonfinite!r}; choose 'error' or 'zero'")
        self.url, self.split = url.rstrip("/"), split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.drop_last, self.nonfinite = seed, shuffle_buffer, drop_last, nonfinite
        self.manifest: Manifest = read_manifest(url)
        m = self.manifest
        if split not in m.splits:
            raise DataError(f"{self.url}: no split '{split}'; the data set has {sorted(m.splits)}")
        self._spec = m.splits[split]
        if self._spec.rows <= 0 or not self._spec.files:
            raise DataError(f"{self.url}: split '{split}' is empty (0 rows); re-create the data set or choose "
                            f"another split")
        if modalities:
            unknown = [x for x in modalities if x not in m.modalities]
            if unknown:
                raise DataError(f"{self.url}: modalit{'y' if len(unknown) == 1 else 'ies'} {unknown} requested "
                                f"(data.modalities) but the data set has only {sorted(m.modalities)}")
            self.modalities = list(modalities)
        else:
            self.modalities = list(m.modalities)
        self._fs, self._root = dataset_fs(url)
        self._columns = ["id", "label"]
        for name in self.modalities:
            self._columns.append(name)
            if m.modalities[name].sequence:
                self._columns.append(f"{name}__mask")
        if m.num_concepts:
            self._columns.append("concepts")
        file_rows = [self._verify_file(f) for f in self._spec.files]
        if sum(file_rows) != self._spec.rows:
            raise DataError(f"{self.url}/manifest.json: split '{split}' declares {self._spec.rows} rows but its "
                            f"shards hold {sum(file_rows)}; re-create the data set")
        self._file_rows = file_rows
        self.batches_per_epoch = self._count_batches(file_rows)
        self._epoch = 0
        self._batches_done = 0

    # ------------------------------------------------------------------------------------------
    # Opening: checksums, footer, columns, labels
    # ------------------------------------------------------------------------------------------

    def _verify_file(self, fname: str) -> int:
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
        self._check_schema(where, schema)
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

    def _check_schema(self, where: str, schema: pa.Schema) -> None:
        m = self.manifest
        expected: dict[str, tuple[pa.DataType, int | None]] = {"id": (pa.int64(), None), "label": (pa.int64(), None)}
        for name in self.modalities:
            spec = m.modalities[name]
            expected[name] = (pa.float32(), spec.flat_size)
            if spec.sequence:
                expected[f"{name}__mask"] = (pa.bool_(), spec.steps)
        if m.num_concepts:
            expected["concepts"] = (pa.uint8(), m.num_concepts)
        for col, (typ, size) in expected.items():
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

    def _count_batches(self, file_rows: list[int]) -> int:
        w, b, total = self.world_size, self.batch_size, sum(file_rows)
        if len(file_rows) % w == 0:  # split_dataset_by_node hands each rank len/w whole shards
            k = len(file_rows) // w
            ordered = sorted(file_rows)
            lo, hi = sum(ordered[:k]), sum(ordered[-k:])
        else:                        # ... otherwise every w-th row
            lo, hi = total // w, -(-total // w)
        if not self.drop_last:
            return max(1, math.ceil(hi / b))
        if lo // b == 0:
            raise DataError(f"{self.url}: split '{self.split}' gives some of the {w} ranks only {lo} rows, fewer "
                            f"than one batch of {b}; lower the batch size or use fewer ranks")
        return lo // b

    # ------------------------------------------------------------------------------------------
    # Iteration
    # ------------------------------------------------------------------------------------------

    def _epoch_tables(self, epoch: int) -> Iterator[pa.Table]:
        import datasets
        from datasets import Features, List, Value, load_dataset
        from datasets.distributed import split_dataset_by_node

        # load_dataset otherwise pings the Hub to count downloads of the "parquet" builder (3 s timeout
        # per call, i.e. per epoch, on machines without network).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

        files = list(self._spec.files)
        if self.shuffle_buffer > 0:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(files))
            files = [files[i] for i in order]
        fs = self._fs
        local = type(fs).__name__ == "LocalFileSystem"
        urls = [f"{self._root}/{f}" if local else fs.unstrip_protocol(f"{self._root}/{f}") for f in files]
        m = self.manifest
        feats = {"id": Value("int64"), "label": Value("int64")}
        for name in self.modalities:
            spec = m.modalities[name]
            feats[name] = List(Value("float32"), length=spec.flat_size)
            if spec.sequence:
                feats[f"{name}__mask"] = List(Value("bool"), length=spec.steps)
        if m.num_concepts:
            feats["concepts"] = List(Value("uint8"), length=m.num_concepts)
        ds = load_dataset("parquet", data_files={self.split: urls}, split=self.split, streaming=True,
                          columns=self._columns, features=Features(feats))
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        yield from ds.with_format("arrow").iter(batch_size=self.batch_size)

    def _numpy_blocks(self, tables: Iterator[pa.Table]) -> Iterator[dict[str, np.ndarray]]:
        for t in tables:
            n = t.num_rows
            if n == 0:
                continue
            block = {}
            for col in self._columns:
                chunked = t.column(col)
                arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
                if pa.types.is_fixed_size_list(arr.type):
                    block[col] = arr.flatten().to_numpy(zero_copy_only=False).reshape(n, arr.type.list_size)
                else:
                    block[col] = arr.to_numpy(zero_copy_only=False)
            yield block

    def _numpy_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of `epoch`, shuffled and cut into batches (the last one may be short)."""
        blocks = self._numpy_blocks(self._epoch_tables(epoch))
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, epoch, 2, self.rank])
            yield from _shuffled_batches(blocks, self.shuffle_buffer, rng, self.batch_size)
        else:
            yield from _rebatch(blocks, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._batches_done >= self.batches_per_epoch:  # state saved after the epoch's last batch
            self._epoch, self._batches_done = self._epoch + 1, 0
        epoch, skip = self._epoch, self._batches_done
        produced = 0
        for block in self._numpy_batches(epoch):
            if produced == self.batches_per_epoch:
                if self.drop_last:
                    break  # this rank's surplus rows of the epoch
                raise RuntimeError(f"rank {self.rank} has more than {self.batches_per_epoch} batches; this is a "
                                   f"bug in ShardStream's batch count")
            if self.drop_last and len(block["id"]) < self.batch_size:
                break
            produced += 1
            if produced <= skip:
                continue
            batch = self._to_torch(block)
            self._batches_done = produced
            yield batch
        if produced < self.batches_per_epoch:
            if self.drop_last:
                raise RuntimeError(f"rank {self.rank} ran out after {produced} of {self.batches_per_epoch} "
                                   f"batches; this is a bug in ShardStream's batch count")
            empty = self._empty_block()
            while produced < self.batches_per_epoch:
                produced += 1
                if produced <= skip:
                    continue
                self._batches_done = produced
                yield self._to_torch(empty)
        self._epoch, self._batches_done = epoch + 1, 0

    def _empty_block(self) -> dict[str, np.ndarray]:
        block = {"id": np.zeros(0, np.int64), "label": np.zeros(0, np.int64)}
        m = self.manifest
        for name in self.modalities:
            spec = m.modalities[name]
            block[name] = np.zeros((0, spec.flat_size), np.float32)
            if spec.sequence:
                block[f"{name}__mask"] = np.zeros((0, spec.steps), bool)
        if m.num_concepts:
            block["concepts"] = np.zeros((0, m.num_concepts), np.uint8)
        return block

    def _to_torch(self, block: dict[str, np.ndarray]) -> Batch:
        n = len(block["id"])
        ids = _tensor(block["id"])
        features, masks = {}, {}
        for name in self.modalities:
            spec = self.manifest.modalities[name]
            x = _tensor(block[name]).view(n, spec.steps, spec.width)
            # One cheap single-threaded reduction (NaN / inf propagate into the sum; an overflow only
            # sends us to the exact check). torch's threaded kernels stall on busy machines.
            if not np.isfinite(block[name].sum()):
                bad = ~torch.isfinite(x)
                count = int(bad.sum())
                if self.nonfinite == "error":
                    rows = ids[bad.flatten(1).any(1)][:5].tolist()
                    raise DataError(f"{self.url} split '{self.split}': {count} NaN/inf values in modality '{name}' "
                                    f"(rows with id {rows}{'...' if count > 5 else ''}); fix the data or set "
                                    f"data.nonfinite=zero to replace them with 0")
                if count:
                    x.masked_fill_(bad, 0.0)
            features[name] = x
            if spec.sequence:
                masks[name] = _tensor(block[f"{name}__mask"])
            else:
                masks[name] = torch.ones(n, 1, dtype=torch.bool)
        concepts = _tensor(block["concepts"]) if "concepts" in block else None
        return Batch(ids=ids, labels=_tensor(block["label"]), features=features, masks=masks,
                     concepts=concepts)

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._batches_done, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "split": self.split, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"stream state lacks {missing}; it was not written by ShardStream.state_dict()")
        if state["batches_done"] > 0:  # mid-epoch: the replay must see exactly the same pipeline
            mine = self.state_dict()
            differ = [k for k in _STATE_KEYS[2:] if state[k] != mine[k]]
            if differ:
                raise DataError(f"cannot resume mid-epoch: {', '.join(f'{k} {state[k]!r} -> {mine[k]!r}' for k in differ)} "
                                f"changed since the checkpoint; restore them, or resume from an epoch boundary")
            if state["batches_done"] > self.batches_per_epoch:
                raise DataError(f"stream state says {state['batches_done']} batches done, more than this split's "
                                f"{self.batches_per_epoch} per epoch; the data set changed since the checkpoint")
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch. Arrays viewing Arrow buffers are flagged read-only, but each batch's
    buffers were decoded for this batch alone (a slice shares memory only with other rows), so handing
    them out writable is safe and saves a copy of every feature byte."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _shuffled_batches(blocks: Iterator[dict[str, np.ndarray]], size: int, rng: np.random.Generator,
                      batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Streaming shuffle cut into `batch_size`-row batches (the last may be short).

    Each incoming row takes a random slot of a `size`-row buffer and evicts the row that held it; what
    is left is emitted permuted at the end. Vectorised per incoming block. The buffer holds no feature
    bytes: a slot is a (block, row) reference into the decoded (zero-copy Arrow) blocks, which stay alive
    while any of their rows is still buffered or pending. Each batch is then gathered once, block by
    block (`np.take` straight into contiguous slices of freshly allocated output arrays), so every
    feature byte is copied exactly once between decode and torch. Within a batch the rows come grouped
    by source block (in emission order within a group); which rows form which batch is the buffer's
    emission order, cut every `batch_size` rows."""
    live: dict[int, dict[str, np.ndarray]] = {}   # block number -> its decoded columns
    left: dict[int, int] = {}                     # block number -> its rows not yet gathered into a batch
    slot_blk = np.empty(size, np.int64)
    slot_row = np.empty(size, np.int64)
    fill = 0
    pend_blk: list[np.ndarray] = []
    pend_row: list[np.ndarray] = []
    pending = 0

    def cut(final: bool) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pend_blk, pend_row, pending
        if pending < batch_size and not (final and pending):
            return
        blk = np.concatenate(pend_blk) if len(pend_blk) > 1 else pend_blk[0]
        row = np.concatenate(pend_row) if len(pend_row) > 1 else pend_row[0]
        at = 0
        while pending - at >= batch_size or (final and pending > at):
            n = min(batch_size, pending - at)
            yield _gather(live, left, blk[at:at + n], row[at:at + n])
            at += n
        pend_blk, pend_row, pending = ([blk[at:]], [row[at:]], pending - at) if pending > at else ([], [], 0)

    def emit(blk: np.ndarray, row: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        nonlocal pending
        pend_blk.append(blk)
        pend_row.append(row)
        pending += len(blk)
        yield from cut(False)

    for number, block in enumerate(blocks):
        n, start = len(block["id"]), 0
        live[number], left[number] = block, n
        if fill < size:
            take = min(size - fill, n)
            slot_blk[fill:fill + take] = number
            slot_row[fill:fill + take] = np.arange(take)
            fill, start = fill + take, take
        while start < n:
            slots = rng.choice(size, size=min(n - start, size), replace=False)
            out_blk, out_row = slot_blk[slots], slot_row[slots]
            slot_blk[slots] = number
            slot_row[slots] = np.arange(start, start + len(slots))
            start += len(slots)
            yield from emit(out_blk, out_row)
    if fill:
        order = rng.permutation(fill)
        pend_blk.append(slot_blk[:fill][order])
        pend_row.append(slot_row[:fill][order])
        pending += fill
    if pending:
        yield from cut(True)


def _gather(live: dict[int, dict[str, np.ndarray]], left: dict[int, int], blk: np.ndarray,
            row: np.ndarray) -> dict[str, np.ndarray]:
    """One batch from (block, row) references: one copy of every byte into new contiguous arrays;
    blocks with no rows left to gather are released."""
    n = len(blk)
    order = np.argsort(blk, kind="stable")
    blk, row = blk[order], row[order]
    bounds = np.flatnonzero(blk[1:] != blk[:-1]) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [n]))
    first = live[int(blk[0])]
    out = {k: _alloc((n, *v.shape[1:]), v.dtype) for k, v in first.items()}
    for s, e in zip(starts.tolist(), ends.tolist()):
        b = int(blk[s])
        src = live[b]
        idx = row[s:e]
        for k, o in out.items():
            np.take(src[k], idx, axis=0, out=o[s:e], mode="clip")  # 'raise' would buffer: a second copy
        left[b] -= e - s
        if not left[b]:
            del live[b], left[b]
    return out


def _alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A writable, uninitialised numpy array in Arrow's memory pool (the pool the decoded blocks come
    from, which reuses freed pages: measured cheaper than `np.empty`'s fresh, page-faulting memory)."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    buf = pa.allocate_buffer(max(count * dtype.itemsize, 1))
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _rebatch(blocks: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Cut a stream of row blocks into `batch_size`-row batches (the last may be short)."""
    pending: list[dict[str, np.ndarray]] = []
    count = 0
    for block in blocks:
        pending.append(block)
        count += len(block["id"])
        while count >= batch_size:
            merged = pending[0] if len(pending) == 1 else {k: np.concatenate([p[k] for p in pending]) for k in block}
            yield {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            count -= batch_size
            pending = [rest] if count else []
    if count:
        yield pending[0] if len(pending) == 1 else {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
