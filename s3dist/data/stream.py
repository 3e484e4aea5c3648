"""`ShardStream`: one data-parallel rank's resumable stream of ready torch batches from a data set.

Pipeline per epoch (everything batch-wise, no per-row Python):

1. shard order: with shuffling on, the split's shard files are permuted by a generator seeded with
   (seed, epoch), identically on every rank;
2. `datasets.load_dataset("parquet", streaming=True)` + `split_dataset_by_node` give this rank its part
   (whole shards when their count divides the world size, else every world_size-th row); with whole
   shards, `read_threads` readers decode them in parallel, merged back into the one-reader row order
   (see `_epoch_tables`);
3. a shuffle buffer of `shuffle_buffer` rows, seeded with (seed, epoch, rank): each incoming row takes
   a random buffer slot and evicts the row that was there (see `_shuffled_batches`: the slot schedule
   is drawn ahead, so most rows are copied once, straight from the decoded block into their batch);
4. rows are cut into batches, checked for NaN / inf (unless the manifest's counts rule them out) and
   handed out as torch tensors; steps 1-3 run in a background thread `prefetch` batches ahead of the
   consumer, and a training stream starts the next epoch's thread while the last batches of this one
   are consumed (`prefetch_next_epoch`; early enough to fill its shuffle buffer and read `prefetch`
   batches).

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
Parquet footer, check its columns against the manifest and its labels against the declared classes;
NaN / inf values the manifest records in a modality in use stop it here (nonfinite='error').
That is one sequential read of the split per rank per open (about a second per GB); the stream then
reads the shards again while iterating.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import io
import math
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from s3dist.data import DataError
from s3dist.data.manifest import Manifest, dataset_fs, read_manifest
from s3dist.data.writer import ROW_GROUP_ROWS

_STATE_KEYS = ("epoch", "batches_done", "seed", "rank", "world_size", "batch_size", "shuffle_buffer", "split",
               "drop_last")
# Version of the row order within an epoch. A mid-epoch resume replays the epoch, so it must produce the
# same order as the run that saved the state; bump this whenever the order changes. 1: eviction buffer
# with picks drawn per input block (s3dist <= 0.1 checkpoints carry no key), 2: picks drawn per batch.
ORDER_VERSION = 2


@dataclass
class Batch:
    ids: torch.Tensor                   # int64 [B]
    labels: torch.Tensor                # int64 [B]
    features: dict[str, torch.Tensor]   # float32 [B, T, D]; a [D] modality gets T = 1
    masks: dict[str, torch.Tensor]      # bool [B, T], True = real step
    concepts: torch.Tensor | None       # uint8 [B, K] (synthetic data only)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """This batch on `device` (the same object when it is already there, e.g. on CPU)."""
        device = torch.device(device)
        if self.ids.device == device:
            return self
        move = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return Batch(ids=move(self.ids), labels=move(self.labels),
                     features={m: move(x) for m, x in self.features.items()},
                     masks={m: move(x) for m, x in self.masks.items()},
                     concepts=None if self.concepts is None else move(self.concepts))


class ShardStream:
    """This rank's batches of one split of a data set; see the module docstring for the design."""

    def __init__(self, url: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 modalities: list[str] | None = None, seed: int = 0, shuffle_buffer: int = 0,
                 drop_last: bool = True, nonfinite: str = "error", prefetch: int = 2,
                 prefetch_next_epoch: bool | None = None, read_threads: int = 2):
        if batch_size < 1:
            raise DataError(f"batch_size = {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if nonfinite not in ("error", "zero"):
            raise DataError(f"nonfinite = {nonfinite!r}; choose 'error' or 'zero'")
        self.url, self.split = url.rstrip("/"), split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        if prefetch < 0:
            raise DataError(f"prefetch = {prefetch} must be >= 0 (batches read ahead; 0 reads in the caller's thread)")
        self.seed, self.shuffle_buffer, self.drop_last, self.nonfinite = seed, shuffle_buffer, drop_last, nonfinite
        self.prefetch = prefetch
        if read_threads < 1:
            raise DataError(f"read_threads = {read_threads} must be >= 1 (threads decoding shards in parallel)")
        self.read_threads = read_threads
        # Start reading the next epoch while the last batches of this one are consumed: the epoch start
        # (a new load_dataset, refilling the shuffle buffer) otherwise stalls the consumer once per epoch,
        # which matters for small data sets on many ranks (MOSI: ~5 steps per epoch on 8 GPUs). On for
        # training streams (drop_last, read epoch after epoch); an evaluation stream, read once, would
        # leave a reader waiting for an epoch nobody asks for.
        # Needs the reader thread, so never with prefetch=0.
        self.prefetch_next_epoch = prefetch > 0 and (drop_last if prefetch_next_epoch is None else prefetch_next_epoch)
        # [(epoch, reader)] or [None]: a box the finalizer below can see without referencing the stream
        self._ahead_box: list[tuple[int, _Prefetcher] | None] = [None]
        weakref.finalize(self, _stop_ahead, self._ahead_box)
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
        self._file_rows = dict(zip(self._spec.files, file_rows))
        self._finite_check = self._nonfinite_at_open()
        if sum(file_rows) != self._spec.rows:
            raise DataError(f"{self.url}/manifest.json: split '{split}' declares {self._spec.rows} rows but its "
                            f"shards hold {sum(file_rows)}; re-create the data set")
        self.batches_per_epoch = self._count_batches(file_rows)
        # Output batches of the shuffle, recycled across batches and epochs (see _BufferPool): the
        # batches pending in the shuffle (about 3 buffers' worth) plus a few the consumer still holds.
        self._pool = _BufferPool(per_shape=3 * shuffle_buffer // batch_size + 8)
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

    def _nonfinite_at_open(self) -> set[str]:
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
        if bad and self.nonfinite == "error":
            name, total = next(iter(bad.items()))
            files = [f for f in self._spec.files if self._spec.nonfinite.get(f, {}).get(name)]
            ids = self._nonfinite_ids(files[0], name)
            more = f" and {len(files) - 1} more shard{'s' if len(files) > 2 else ''}" if len(files) > 1 else ""
            raise DataError(f"{self.url} split '{self.split}': {total} NaN/inf values in modality '{name}' (rows "
                            f"with id {ids}{'...' if total > len(ids) else ''} in {files[0]}{more}); fix the data or "
                            f"set data.nonfinite=zero to replace them with 0")
        return set(bad)

    def _nonfinite_ids(self, fname: str, name: str, limit: int = 5) -> list[int]:
        with self._fs.open(f"{self._root}/{fname}", "rb") as f:
            t = pq.read_table(f, columns=["id", name])
        rows = np.flatnonzero(~np.isfinite(_column_numpy(t.column(name))).all(axis=1))[:limit]
        return t.column("id").to_numpy()[rows].tolist()

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

    def _epoch_files(self, epoch: int) -> list[str]:
        """The split's shard files in this epoch's order: permuted by (seed, epoch) when shuffling, the
        same on every rank."""
        files = list(self._spec.files)
        if self.shuffle_buffer > 0:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(files))
            files = [files[i] for i in order]
        return files

    def _readers(self, n_files: int) -> int:
        """How many threads decode this rank's shards in parallel: only where `split_dataset_by_node`
        hands out whole shards (so they can be read in any grouping), at most one per shard of this rank,
        and never with prefetch=0 (which reads in the caller's thread)."""
        w = self.world_size
        if self.prefetch == 0 or n_files % w:
            return 1
        return max(1, min(self.read_threads, n_files // w))

    def _epoch_tables(self, epoch: int) -> Iterator[pa.Table]:
        """This rank's rows of `epoch`, as Arrow tables in shard order.

        With k > 1 reader threads the row sequence is exactly that of one reader. `split_dataset_by_node`
        gives rank r shards r, r + w, r + 2w, ... of the epoch's list, so the list is cut into groups of w
        consecutive shards, reader i gets groups i, i + k, ... (each its own `load_dataset` +
        `split_dataset_by_node`, which picks shard r of every group), and the merge takes each shard's rows
        from its reader in the original group order. Each reader decodes up to `_READER_DEPTH` blocks
        ahead, so while one shard is consumed the next ones are being decoded on other cores (Arrow
        releases the GIL). Why: decoding is the stream's main cost and Arrow decodes a row group's
        columns in parallel only as far as the columns allow (one wide modality dominates), so a single
        reader leaves cores idle. Shuffling depends only on the row sequence, so batches are the same for
        any k (tested)."""
        files = self._epoch_files(epoch)
        k = self._readers(len(files))
        if k == 1:
            yield from self._read(files)
            return
        w = self.world_size
        groups = [files[g:g + w] for g in range(0, len(files), w)]
        readers = [_Prefetcher(self._read([f for group in groups[i::k] for f in group]), _READER_DEPTH)
                   for i in range(k)]
        try:
            rows = [_RowTaker(iter(r)) for r in readers]
            for g, group in enumerate(groups):
                yield from rows[g % k].take(self._file_rows[group[self.rank]], group[self.rank])
        finally:
            for r in readers:
                r.close()

    def _read(self, files: list[str]) -> Iterator[pa.Table]:
        """`files` (shard names, in order) through `datasets` streaming, split for this rank."""
        import datasets
        from datasets import Features, List, Value, load_dataset
        from datasets.distributed import split_dataset_by_node

        # load_dataset otherwise pings the Hub to count downloads of the "parquet" builder (3 s timeout
        # per call, i.e. per epoch, on machines without network).
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False

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
        # One at a time: parallel readers (and the next epoch's) open their parts concurrently, and
        # load_dataset's file resolution runs tqdm's thread_map, whose class-level lock set-up is not
        # thread-safe (AttributeError: type object 'tqdm' has no attribute '_lock'). Only the opening is
        # serialised; the decoding below runs in parallel.
        with _OPEN_LOCK:
            ds = load_dataset("parquet", data_files={self.split: urls}, split=self.split, streaming=True,
                              columns=self._columns, features=Features(feats))
            if self.world_size > 1:
                ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world_size)
        # Blocks of whole row groups whatever the batch size: the shuffle and the re-batching below take
        # any block size, so cutting here into batch-sized slices would only add per-block overhead (and
        # make `_READER_DEPTH` blocks a shorter read-ahead).
        yield from ds.with_format("arrow").iter(batch_size=ROW_GROUP_ROWS)

    def _numpy_blocks(self, tables: Iterator[pa.Table]) -> Iterator[dict[str, np.ndarray]]:
        for t in tables:
            if t.num_rows:
                yield {col: _column_numpy(t.column(col)) for col in self._columns}

    def _numpy_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """This rank's rows of `epoch`, shuffled and cut into batches (the last one may be short)."""
        blocks = self._numpy_blocks(self._epoch_tables(epoch))
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, epoch, 2, self.rank])
            yield from _shuffled_batches(blocks, self.shuffle_buffer, rng, self.batch_size, self._pool)
        else:
            yield from _rebatch(blocks, self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._batches_done >= self.batches_per_epoch:  # state saved after the epoch's last batch
            self._epoch, self._batches_done = self._epoch + 1, 0
        epoch, skip = self._epoch, self._batches_done
        produced = 0
        # Start the next epoch's reader when this many batches of the epoch are left to hand out: the
        # batches it reads ahead plus those it must read to fill its shuffle buffer before its first one.
        ahead_at = self.prefetch + -(-self.shuffle_buffer // self.batch_size) if self.prefetch_next_epoch else 0
        for block in self._epoch_source(epoch):
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
            if ahead_at and self.batches_per_epoch - produced <= ahead_at - 1:
                self._start_ahead(epoch + 1)
                ahead_at = 0
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

    def _epoch_source(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's numpy batches: from the reader started ahead for it, else a new one."""
        ahead = self._ahead_box[0]
        if ahead is not None and ahead[0] == epoch and not ahead[1].closed:
            self._ahead_box[0] = None
            return iter(ahead[1])
        self.close()  # started for another position
        return _prefetched(self._numpy_batches(epoch), self.prefetch)

    def _start_ahead(self, epoch: int) -> None:
        # Every epoch is a deterministic function of (seed, epoch, rank, world_size): reading it early
        # changes no batch. The reader thread works on a shallow copy of the stream (same files, pool
        # and settings), so it holds no reference to this object: a stream dropped without close() is
        # still collected, and its finalizer stops the reader.
        self.close()
        reader = copy.copy(self)
        reader._ahead_box = [None]
        self._ahead_box[0] = (epoch, _Prefetcher(reader._numpy_batches(epoch), self.prefetch))

    def close(self) -> None:
        """Stop a reader started ahead for the next epoch (the trainer calls this when it is done)."""
        _stop_ahead(self._ahead_box, wait=True)

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
            # Only where the manifest does not rule NaN / inf out (see `_nonfinite_at_open`). One cheap
            # single-threaded reduction (NaN / inf propagate into the sum; an overflow only sends us to
            # the exact check). torch's threaded kernels stall on busy machines.
            if name in self._finite_check and not np.isfinite(block[name].sum()):
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
                "split": self.split, "drop_last": self.drop_last, "order_version": ORDER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"stream state lacks {missing}; it was not written by ShardStream.state_dict()")
        if state["batches_done"] > 0:  # mid-epoch: the replay must see exactly the same pipeline
            mine = self.state_dict()
            differ = [k for k in _STATE_KEYS[2:] if state[k] != mine[k]]
            if state.get("order_version", 1) != ORDER_VERSION and self.shuffle_buffer > 0:
                differ.append("order_version")
                state = {**state, "order_version": state.get("order_version", 1)}
            if differ:
                raise DataError(f"cannot resume mid-epoch: {', '.join(f'{k} {state[k]!r} -> {mine[k]!r}' for k in differ)} "
                                f"changed since the checkpoint (order_version: this s3dist shuffles rows in a "
                                f"different order); restore them, or resume from an epoch boundary")
            if state["batches_done"] > self.batches_per_epoch:
                raise DataError(f"stream state says {state['batches_done']} batches done, more than this split's "
                                f"{self.batches_per_epoch} per epoch; the data set changed since the checkpoint")
        self.close()  # a reader started ahead belongs to the position being replaced
        self._epoch, self._batches_done = int(state["epoch"]), int(state["batches_done"])


_OPEN_LOCK = threading.Lock()
_READER_DEPTH = 4  # blocks (row groups) a parallel reader decodes ahead: a default 1024-row shard


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


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def _stop_ahead(box: list, wait: bool = False) -> None:
    """Stop the reader in `box` (a ShardStream's read-ahead slot); also its finalizer, hence no join
    unless asked (a finalizer may run in any thread)."""
    ahead, box[0] = box[0], None
    if ahead is not None:
        ahead[1].close(wait=wait)


class _Prefetcher:
    """`items`, produced by a background thread up to `depth` items ahead of the consumer; the thread
    starts at construction, so a producer can be set going before anyone asks for its first item.

    Parquet decoding (Arrow) and numpy's large copies release the GIL, so reading and shuffling the next
    batches overlaps whatever the consumer does with this one (a training step, or, in the benchmark,
    Arrow's own decode threads). Order and content are exactly those of `items`; an exception raised
    while producing is re-raised in the consumer at the position where it happened. `close()` (also
    run when the consumer stops iterating early) stops the thread at its next hand-over."""

    def __init__(self, items: Iterator, depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="s3dist-data-prefetch",
                                        daemon=True)
        self._thread.start()
        _LIVE_READERS.add(self)

    def _hand_over(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(x, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, items: Iterator) -> None:
        try:
            for x in items:
                if not self._hand_over(x):
                    return
            self._hand_over(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._hand_over(_Raised(e))
        finally:
            # Now, in this thread: a generator's cleanup (e.g. stopping the readers it started) must not
            # wait for garbage collection.
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        try:
            while True:
                try:
                    x = self._q.get(timeout=0.05)
                except queue.Empty:
                    # Stopped from elsewhere (the exit hook closes every reader, in any order): the
                    # producer hands over nothing more, so waiting would hang; a silent end would
                    # shorten the epoch.
                    if self._stop.is_set():
                        raise RuntimeError("a data reader was stopped while its items were still being "
                                           "consumed (its stream was closed, or the interpreter is exiting)")
                    continue
                if x is _END:
                    return
                if isinstance(x, _Raised):
                    raise x.error
                yield x
        finally:
            self.close()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()


# Readers still running when the interpreter exits (a stream read ahead and never closed) are stopped
# and joined first: a daemon thread still inside Arrow's decoder while Python tears down aborts the
# process (SIGABRT, seen in the 2-rank resume test under load).
_LIVE_READERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_readers() -> None:
    for reader in list(_LIVE_READERS):
        reader.close()


def _prefetched(items: Iterator, depth: int) -> Iterator:
    """`items` through a `_Prefetcher` of `depth` (0: in the caller's thread)."""
    if depth <= 0:
        yield from items
    else:
        yield from _Prefetcher(items, depth)


def _column_numpy(chunked: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: [n] for scalars, [n, size] for fixed-size lists (zero-copy where Arrow's
    layout allows: one chunk, not bool)."""
    arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    return arr.to_numpy(zero_copy_only=False)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch. Arrays viewing Arrow buffers are flagged read-only, but each batch's
    buffers were decoded for this batch alone (a slice shares memory only with other rows), so handing
    them out writable is safe and saves a copy of every feature byte."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


class _BufferPool:
    """Recycled output arrays for shuffled batches.

    Fresh memory for every batch costs more than the copy into it: each new 15 MB text batch is
    page-faulted in, and the allocator hands freed pages back to the OS soon after (measured: system
    time of a shuffled pass 0.3-0.5 s vs 0.06 s for plain pyarrow). An array is reused only once nobody
    else references it: a torch tensor made with `torch.from_numpy` (and every view of it) keeps its
    numpy array alive, so a batch the consumer still holds is never overwritten. At most `per_shape`
    arrays are kept per (shape, dtype); beyond that, allocations are simply not pooled."""

    def __init__(self, per_shape: int = 16):
        self.per_shape = per_shape
        self._arrays: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        # The reference count of an array only the pool holds, measured through the same code path
        # as in `get` (the interpreter's own references differ between Python versions).
        self._idle = min(n for _, n in self._counted([np.empty(0)]))

    @staticmethod
    def _counted(arrays: list[np.ndarray]) -> Iterator[tuple[np.ndarray, int]]:
        for a in arrays:
            yield a, sys.getrefcount(a)

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        # Around an epoch boundary two readers (this epoch's, the next one's) take arrays at once: the
        # idle test and the hand-out must be one step, or both could take the same array.
        with self._lock:
            arrays = self._arrays.setdefault((shape, dtype.str), [])
            for a, refs in self._counted(arrays):
                if refs <= self._idle:   # more references: a consumer or a pending batch still holds it
                    return a
            a = np.empty(shape, dtype)
            if len(arrays) < self.per_shape:
                arrays.append(a)
            return a


_ROW_COPY_BYTES = 2048  # rows at least this wide are copied one by one (cheaper than a gathered temporary)


def _shuffled_batches(blocks: Iterator[dict[str, np.ndarray]], size: int, rng: np.random.Generator,
                      batch_size: int, pool: _BufferPool | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Streaming shuffle cut into `batch_size`-row batches (the last may be short).

    Semantics: a `size`-slot eviction buffer. The first `size` rows fill it; every later row takes a
    random slot and evicts its occupant to the output; at the end the remaining occupants follow in a
    random permutation. Slots are picked `min(batch_size, size)` at a time without replacement
    (`rng.choice`), a fixed schedule that does not depend on how the input is cut into blocks.

    Implementation: the schedule is drawn `2 * size` arrivals ahead of the input, so when a row arrives
    the time its slot is next picked (= its output position) is usually already known, and the row is
    copied straight from its decoded block into its output batch; the block is released as soon as it
    has been scattered. A row whose eviction lies beyond the drawn schedule (about e^-2 = 14% of rows)
    waits in a per-slot overflow store and is copied out when its eviction gets drawn. So 86% of the
    bytes are copied once and 14% twice, no decoded block outlives its arrival, and the output batches
    are recycled through `_BufferPool`. Holding decoded blocks until their last row left (the previous
    design) kept ~0.5 GB of MOSI-shaped blocks alive and made the allocator hand pages back to the OS
    and fault them in again on every batch (0.3-0.5 s of system time per 8k rows)."""
    chunk = min(batch_size, size)
    ahead = 2 * size
    span = ahead + 2 * chunk + size                # arrival times whose slot / destination are kept
    pool = pool or _BufferPool()
    slot_of = np.zeros(span, np.int64)             # ring: arrival time -> buffer slot it takes
    dest = np.full(span, -1, np.int64)             # ring: arrival time -> output position (-1: not drawn yet)
    last = np.arange(size, dtype=np.int64)         # slot -> arrival time of its latest scheduled occupant
    loc = np.full(size, -1, np.int64)              # slot -> output position holding its occupant; -1: overflow
    slot_of[:size] = np.arange(size)
    drawn = size                                   # slot picks are known for arrival times < drawn
    arrived = 0
    emitted = 0                                    # batches handed out
    pending: dict[int, dict[str, np.ndarray]] = {}  # batch number -> its output arrays
    overflow: dict[str, np.ndarray] = {}
    template: dict[str, np.ndarray] = {}           # one row of every column (shapes and dtypes)

    def put(positions: np.ndarray, src: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Copy `src` rows `rows` to output positions `positions`, one output batch at a time."""
        if not len(positions):
            return
        order = np.argsort(positions, kind="stable")
        positions, rows = positions[order], rows[order]
        j = positions // batch_size
        cuts = np.flatnonzero(j[1:] != j[:-1]) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(j)]):
            b = int(j[lo])
            if b not in pending:
                pending[b] = {k: pool.get((batch_size, *v.shape[1:]), v.dtype) for k, v in template.items()}
            at, idx = positions[lo:hi] % batch_size, rows[lo:hi]
            pairs = None
            for k, o in pending[b].items():
                if o[0].nbytes < _ROW_COPY_BYTES:
                    o[at] = src[k][idx]
                else:  # numpy's fancy assignment gathers into a temporary first: twice the memory traffic
                    pairs = pairs or list(zip(at.tolist(), idx.tolist()))
                    sk = src[k]
                    for i, r in pairs:
                        o[i] = sk[r]

    def draw_until(t: int) -> None:
        nonlocal drawn
        while drawn < t:
            slots = rng.choice(size, size=chunk, replace=False)
            times = np.arange(drawn, drawn + chunk)
            prev = last[slots]                     # arrival times of the occupants these picks evict
            last[slots] = times
            slot_of[times % span] = slots
            dest[times % span] = -1
            out_pos = times - size                 # the arrival at time t evicts into output position t - size
            here = prev < arrived                  # already arrived, so waiting in the overflow store
            if here.any():
                put(out_pos[here], overflow, slots[here])
                loc[slots[here]] = out_pos[here]
            dest[prev[~here] % span] = out_pos[~here]
            drawn += chunk

    for block in blocks:
        n = len(block["id"])
        if not template:
            template = {k: v[:1] for k, v in block.items()}
            overflow = {k: pool.get((size, *v.shape[1:]), v.dtype) for k, v in template.items()}
        start = 0
        while start < n:
            # A piece never crosses a pick chunk, so its slots are distinct.
            edge = size - arrived if arrived < size else chunk - (arrived - size) % chunk
            m = min(n - start, edge)
            draw_until(arrived + m + ahead)
            ring = np.arange(arrived, arrived + m) % span
            slots, d = slot_of[ring], dest[ring]
            rows = np.arange(start, start + m)
            known = d >= 0
            put(d[known], block, rows[known])
            for k, o in overflow.items():
                o[slots[~known]] = block[k][rows[~known]]
            loc[slots] = np.where(known, d, -1)
            arrived += m
            start += m
            while (emitted + 1) * batch_size <= arrived - size:  # every position of the batch is filled
                yield pending.pop(emitted)
                emitted += 1
        # `block` can go now: each of its rows lives in an output batch or in the overflow store.

    if not arrived:
        return
    # The end: the buffer's occupants follow in a random permutation. They sit in pending batches (at
    # positions >= arrived - fill, the very region they are going to) or in the overflow store, so they
    # are gathered into a temporary first, then written into place.
    fill = min(arrived, size)
    order = rng.permutation(fill)
    where = loc[order]
    final = {k: pool.get((fill, *v.shape[1:]), v.dtype) for k, v in template.items()}
    in_out, in_ovf = np.flatnonzero(where >= 0), np.flatnonzero(where < 0)
    for k, f in final.items():
        for i, p in zip(in_out.tolist(), where[in_out].tolist()):
            f[i] = pending[p // batch_size][k][p % batch_size]
        f[in_ovf] = overflow[k][order[in_ovf]]
    put(np.arange(arrived - fill, arrived), final, np.arange(fill))
    for j in range(emitted, (arrived - 1) // batch_size + 1):
        out = pending.pop(j)
        rows = min(batch_size, arrived - j * batch_size)
        yield out if rows == batch_size else {k: v[:rows] for k, v in out.items()}


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
