"""`ShardStream`: one data-parallel rank's resumable stream of ready torch batches from a data set.

The rows of an epoch are dealt into `partitions` (P) streams that do not depend on the world size;
rank r of w serves partitions r, r + w, ... (P is a multiple of w; by default P = w, one per rank).
Per partition and epoch (everything batch-wise, no per-row Python):

1. shard order: with shuffling on, the split's shard files are permuted by a generator seeded with
   (seed, epoch), identically on every rank;
2. `datasets.load_dataset("parquet", streaming=True)` + `split_dataset_by_node(rank=p, world_size=P)`
   give partition p its rows (whole shards when their count divides P, else every P-th row), decoded by
   up to `read_threads` threads (`s3dist.data.reader`);
3. a shuffle buffer of `shuffle_buffer` rows seeded with (seed, epoch, p) (`s3dist.data.shuffle`).

Every step takes the next q = batch_size x world_size / P rows of every partition; a rank's batch is
its partitions' rows side by side. Steps 1-3 and the merge run in background threads `prefetch`
batches ahead of the consumer (`s3dist.data.readahead`), and a training stream starts the next epoch's
readers while the last batches of this one are consumed (`prefetch_next_epoch`).

Exactly-once resume, also on another world size. Each partition's row sequence is a deterministic
function of (seed, epoch, P, shuffle_buffer, shuffle chunk), none of which depends on the ranks, and all
partitions advance in lockstep, so the stream's state is (epoch, rows taken from each partition). A
resume replays each of its partitions from the epoch's start and discards the rows already taken
(re-reading and re-shuffling them: well under a second per thousand MOSI-shaped batches, once per
restart), then continues with its own q: a run of 2 ranks resumed on 1 (P = 2) serves both partitions
from where they stopped, so no sample of the epoch is repeated or skipped. P and the shuffle chunk are
fixed when the run starts (`data.partitions`: set it to a multiple of every world size the run may
resume on); a mid-epoch state that the new world size cannot continue (w not dividing P) is refused.
The state also carries the split's fingerprint (a hash of its shards' checksums): a mid-epoch state on a
data set replaced at the same path is refused, and at an epoch boundary the change is logged.
(`datasets` does not restore its shuffle buffer from `IterableDataset.state_dict`, hence the replay.)

Equal batch counts without collectives. Batch counts are derived from manifest row counts only: with
`drop_last=True` every rank hands out floor(min_rows / q) full batches per epoch, where min_rows is
the fewest rows a partition can be given (whole-shard split: the k smallest shards; row split: total //
P); a partition's surplus rows of that epoch are dropped, as a last partial batch would be. With
`drop_last=False` (evaluation) every rank hands out ceil(max_rows / q) batches covering all its rows
once, then empty (B = 0) batches, so no rank waits alone in a collective.

Shards are verified when the stream opens (`s3dist.data.validate`). Output buffers are reused only when
their consumer hands them back (`Batch.release`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from s3dist.data import DataError
from s3dist.data.manifest import Manifest, dataset_fs, read_manifest
from s3dist.data.readahead import Prefetcher, prefetched, stop_ahead
from s3dist.data.reader import PartitionReader
from s3dist.data.shuffle import BufferPool, rebatch, recut, shuffled_batches
from s3dist.data.validate import SHOWN_IDS, SplitCheck, nonfinite_error

log = logging.getLogger("s3dist")

_STATE_KEYS = ("epoch", "batches_done", "seed", "rank", "world_size", "batch_size", "shuffle_buffer", "split",
               "drop_last")
# What fixes an epoch's row order besides the partitions: a mid-epoch resume must find them unchanged.
_ORDER_KEYS = ("seed", "shuffle_buffer", "split", "drop_last")
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
    _buffers: tuple = field(default=(), repr=False, compare=False)
    _pool: BufferPool | None = field(default=None, repr=False, compare=False)

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

    def release(self) -> None:
        """Hand this batch's host memory back to its stream for a later batch. Call it once neither the
        batch nor any tensor viewing it is used any more (the trainer does after each step); a batch
        never released is simply never reused."""
        if self._pool is not None:
            self._pool.give_back(self._buffers)
        self._pool, self._buffers = None, ()


class ShardStream:
    """This rank's batches of one split of a data set; see the module docstring for the design."""

    def __init__(self, url: str, split: str, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 modalities: list[str] | None = None, seed: int = 0, shuffle_buffer: int = 0,
                 drop_last: bool = True, nonfinite: str = "error", prefetch: int = 2,
                 prefetch_next_epoch: bool | None = None, read_threads: int = 2, partitions: int = 0):
        if batch_size < 1:
            raise DataError(f"batch_size = {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if nonfinite not in ("error", "zero"):
            raise DataError(f"nonfinite = {nonfinite!r}; choose 'error' or 'zero'")
        if prefetch < 0:
            raise DataError(f"prefetch = {prefetch} must be >= 0 (batches read ahead; 0 reads in the caller's thread)")
        if read_threads < 1:
            raise DataError(f"read_threads = {read_threads} must be >= 1 (threads decoding shards in parallel)")
        if partitions < 0:
            raise DataError(f"partitions = {partitions} must be >= 0 (0: one per rank)")
        self.url, self.split = url.rstrip("/"), split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer, self.drop_last, self.nonfinite = seed, shuffle_buffer, drop_last, nonfinite
        self.prefetch, self.read_threads = prefetch, read_threads
        # Start reading the next epoch while the last batches of this one are consumed: the epoch start
        # (a new load_dataset, refilling the shuffle buffer) otherwise stalls the consumer once per epoch,
        # which matters for small data sets on many ranks (MOSI: ~5 steps per epoch on 8 GPUs). On for
        # training streams (drop_last, read epoch after epoch); an evaluation stream, read once, would
        # leave a reader waiting for an epoch nobody asks for.
        # Needs the reader thread, so never with prefetch=0.
        self.prefetch_next_epoch = prefetch > 0 and (drop_last if prefetch_next_epoch is None else prefetch_next_epoch)
        # [(epoch, reader)] or [None]: a box the finalizer below can see without referencing the stream
        self._ahead_box: list[tuple[int, Prefetcher] | None] = [None]
        weakref.finalize(self, stop_ahead, self._ahead_box)
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
        fs, root = dataset_fs(url)
        self._columns = m.columns(self.modalities)
        check = SplitCheck(self.url, split, m, fs, root, self.modalities)
        self._file_rows = check.file_rows()
        self._finite_check = check.nonfinite_to_check(nonfinite)
        self._reader = PartitionReader(split, fs, root, self._columns, self._file_rows)
        # Idle output batches handed back by the consumer, kept for the next ones.
        self._pool = BufferPool(per_shape=3 * shuffle_buffer // batch_size + 8)
        self._epoch = 0
        self._rows_done = 0   # rows taken from each of this epoch's partitions
        self._plan(partitions or world_size)
        # The split's content, as its shards' checksums say: a resume on a data set replaced at the same path
        # is told apart from a resume on the data the run trained on.
        self.fingerprint = hashlib.sha256(json.dumps(sorted(self._spec.checksums.items())).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------
    # Planning: partitions and batch counts
    # ------------------------------------------------------------------------------------------

    def _plan(self, partitions: int, chunk: int | None = None) -> None:
        """Set the partition count, rows per partition and step (q), the shuffle chunk (the q of the run
        that fixed the order) and the batch count of an epoch."""
        w, b = self.world_size, self.batch_size
        if partitions % w:
            raise DataError(f"{self.url}: {w} ranks cannot share {partitions} partitions (data.partitions) equally; "
                            f"use a world size dividing {partitions}, or resume from an epoch boundary")
        if (b * w) % partitions:
            raise DataError(f"{self.url}: a step of {w} x {b} rows (data.batch_size) cannot take the same number of "
                            f"rows from each of {partitions} partitions (data.partitions); choose a batch size "
                            f"whose global batch is a multiple of {partitions}")
        self.partitions = partitions
        self._q = b * w // partitions
        self._chunk = chunk or self._q
        rows = list(self._file_rows.values())
        if PartitionReader.whole_shards(len(rows), partitions):
            k, ordered = len(rows) // partitions, sorted(rows)
            self._lo, self._hi = sum(ordered[:k]), sum(ordered[-k:])
        else:
            self._lo, self._hi = sum(rows) // partitions, -(-sum(rows) // partitions)
        if not self.drop_last:
            self.batches_per_epoch = max(1, math.ceil(self._hi / self._q))
        elif self._lo // self._q == 0:
            who = f"of the {w} ranks" if partitions == w else f"of the {partitions} partitions"
            raise DataError(f"{self.url}: split '{self.split}' gives some {who} only {self._lo} rows, fewer than one "
                            f"batch of {self._q}; lower the batch size or use fewer ranks")
        else:
            self.batches_per_epoch = self._lo // self._q

    def _batches_left(self, rows_done: int) -> int:
        if self.drop_last:
            return max(0, (self._lo - rows_done) // self._q)
        return max(0, self.batches_per_epoch - rows_done // self._q)

    def _epoch_files(self, epoch: int) -> list[str]:
        """The split's shard files in this epoch's order: permuted by (seed, epoch) when shuffling, the
        same on every rank."""
        files = list(self._spec.files)
        if self.shuffle_buffer > 0:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(files))
            files = [files[i] for i in order]
        return files

    def _readers(self, n_files: int) -> int:
        """How many threads decode each of this rank's partitions: only where `split_dataset_by_node`
        hands out whole shards (so they can be read in any grouping), at most one per shard of the
        partition, `read_threads` shared by the rank's partitions, and never with prefetch=0 (which reads
        in the caller's thread)."""
        p = self.partitions
        if self.prefetch == 0 or not PartitionReader.whole_shards(n_files, p):
            return 1
        return max(1, min(self.read_threads // (p // self.world_size), n_files // p))

    # ------------------------------------------------------------------------------------------
    # Iteration
    # ------------------------------------------------------------------------------------------

    def _partition_batches(self, files: list[str], epoch: int, part: int, skip: int) -> Iterator[dict]:
        """Partition `part`'s batches of q rows from its row `skip` on."""
        blocks = self._reader.blocks(files, part, self.partitions, self._readers(len(files)))
        if self.shuffle_buffer > 0:
            rng = np.random.default_rng([self.seed, epoch, 2, part])
            batches = shuffled_batches(blocks, self.shuffle_buffer, rng, self._chunk, self._pool)
        else:
            batches = rebatch(blocks, self._chunk)
        return recut(batches, skip, self._q, self._pool)

    def _numpy_batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's batches of `epoch` from row `skip` of each partition on (the last may be short)."""
        files = self._epoch_files(epoch)
        mine = range(self.rank, self.partitions, self.world_size)
        sources = [self._partition_batches(files, epoch, p, skip) for p in mine]
        if len(sources) == 1:
            yield from sources[0]
            return
        # Several partitions: each read and shuffled in its own thread, their batches side by side.
        readers = [Prefetcher(s, max(self.prefetch, 1)) for s in sources] if self.prefetch else sources
        try:
            for parts in itertools.zip_longest(*readers):
                parts = [p for p in parts if p is not None]
                n = sum(len(p["id"]) for p in parts)
                out = {k: self._pool.get((n, *v.shape[1:]), v.dtype) for k, v in parts[0].items()}
                for k, o in out.items():
                    np.concatenate([p[k] for p in parts], out=o)
                for p in parts:
                    self._pool.give_back(p.values())
                yield out
        finally:
            for r in readers:
                if isinstance(r, Prefetcher):
                    r.close()

    def __iter__(self) -> Iterator[Batch]:
        if self._rows_done and not self._batches_left(self._rows_done):  # state saved at the epoch's end
            self._epoch, self._rows_done = self._epoch + 1, 0
        epoch, start = self._epoch, self._rows_done
        left = self._batches_left(start)
        produced = 0
        # Start the next epoch's reader when this many batches of the epoch are left to hand out: the
        # batches it reads ahead plus those it must read to fill its shuffle buffer before its first one.
        ahead_at = self.prefetch + -(-self.shuffle_buffer // self._q) if self.prefetch_next_epoch else 0
        for block in self._epoch_source(epoch, start):
            if produced == left:
                if self.drop_last:
                    break  # this rank's surplus rows of the epoch
                raise RuntimeError(f"rank {self.rank} has more than {self.batches_per_epoch} batches; this is a "
                                   f"bug in ShardStream's batch count")
            if self.drop_last and len(block["id"]) < self.batch_size:
                break
            produced += 1
            batch = self._to_torch(block)
            self._rows_done = start + produced * self._q
            if ahead_at and left - produced <= ahead_at - 1:
                self._start_ahead(epoch + 1)
                ahead_at = 0
            yield batch
        if produced < left:
            if self.drop_last:
                raise RuntimeError(f"rank {self.rank} ran out after {produced} of {left} batches; this is a bug "
                                   f"in ShardStream's batch count")
            empty = self._empty_block()
            while produced < left:
                produced += 1
                self._rows_done = start + produced * self._q
                yield self._to_torch(empty)
        self._epoch, self._rows_done = epoch + 1, 0

    def _epoch_source(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's numpy batches: from the reader started ahead for it, else a new one."""
        ahead = self._ahead_box[0]
        if skip == 0 and ahead is not None and ahead[0] == epoch and not ahead[1].closed:
            self._ahead_box[0] = None
            return iter(ahead[1])
        self.close()  # started for another position
        return prefetched(self._numpy_batches(epoch, skip), self.prefetch)

    def _start_ahead(self, epoch: int) -> None:
        # Every epoch is a deterministic function of the stream's settings: reading it early changes no
        # batch. The reader thread works on a shallow copy of the stream (same files, pool and
        # settings), so it holds no reference to this object: a stream dropped without close() is still
        # collected, and its finalizer stops the reader.
        self.close()
        reader = copy.copy(self)
        reader._ahead_box = [None]
        self._ahead_box[0] = (epoch, Prefetcher(reader._numpy_batches(epoch), self.prefetch))

    def close(self) -> None:
        """Stop a reader started ahead for the next epoch (the trainer calls this when it is done)."""
        stop_ahead(self._ahead_box, wait=True)

    def _empty_block(self) -> dict[str, np.ndarray]:
        return {c: np.zeros((0,) if size is None else (0, size), dtype) for c, (dtype, size) in self._columns.items()}

    def _to_torch(self, block: dict[str, np.ndarray]) -> Batch:
        n = len(block["id"])
        ids = _tensor(block["id"])
        features, masks = {}, {}
        for name in self.modalities:
            spec = self.manifest.modalities[name]
            x = _tensor(block[name]).view(n, spec.steps, spec.width)
            # Only where the manifest does not rule NaN / inf out (`SplitCheck.nonfinite_to_check`). One cheap
            # single-threaded reduction (NaN / inf propagate into the sum; an overflow only sends us to
            # the exact check). torch's threaded kernels stall on busy machines.
            if name in self._finite_check and not np.isfinite(block[name].sum()):
                bad = ~torch.isfinite(x)
                count = int(bad.sum())
                if self.nonfinite == "error":
                    rows = ids[bad.flatten(1).any(1)][:SHOWN_IDS + 1].tolist()
                    raise nonfinite_error(self.url, self.split, name, count, rows)
                if count:
                    x.masked_fill_(bad, 0.0)
            features[name] = x
            if spec.sequence:
                masks[name] = _tensor(block[f"{name}__mask"])
            else:
                masks[name] = torch.ones(n, 1, dtype=torch.bool)
        concepts = _tensor(block["concepts"]) if "concepts" in block else None
        return Batch(ids=ids, labels=_tensor(block["label"]), features=features, masks=masks,
                     concepts=concepts, _buffers=tuple(block.values()), _pool=self._pool)

    # ------------------------------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "rows_done": self._rows_done, "batches_done": self._rows_done // self._q,
                "partitions": self.partitions, "shuffle_chunk": self._chunk, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "split": self.split, "drop_last": self.drop_last, "order_version": ORDER_VERSION,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, written by this or another world size / batch size (see the module
        docstring); states of s3dist versions without partitions had one partition per rank."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"stream state lacks {missing}; it was not written by ShardStream.state_dict()")
        parts = int(state.get("partitions", state["world_size"]))
        chunk = int(state.get("shuffle_chunk", state["batch_size"]))
        rows = int(state.get("rows_done", state["batches_done"] * state["batch_size"]))
        replaced = state.get("fingerprint", self.fingerprint) != self.fingerprint  # older states have none
        if rows > 0:  # mid-epoch: the replay must see exactly the same row order
            if replaced:
                raise DataError(f"{self.url}: split '{self.split}' is not the data the checkpoint was trained on (its "
                                f"shards' checksums differ: fingerprint {state['fingerprint']} -> {self.fingerprint}), "
                                f"and the checkpoint is in the middle of epoch {state['epoch']}, whose rows cannot "
                                f"be replayed from other data. Point data.path at the run's data (with "
                                f"--force-config), or resume an epoch-boundary checkpoint")
            mine = self.state_dict()
            differ = [f"{k} {state[k]!r} -> {mine[k]!r}" for k in _ORDER_KEYS if state[k] != mine[k]]
            if state.get("order_version", 1) != ORDER_VERSION and self.shuffle_buffer > 0:
                differ.append(f"order_version {state.get('order_version', 1)} -> {ORDER_VERSION}")
            if differ:
                raise DataError(f"cannot resume mid-epoch: {', '.join(differ)} changed since the checkpoint "
                                f"(order_version: this s3dist shuffles rows in a different order); restore them, "
                                f"or resume from an epoch boundary")
            try:
                self._plan(parts, chunk)
            except DataError as e:
                raise DataError(f"the checkpoint is in the middle of epoch {state['epoch']}, which cannot go on "
                                f"with {self.world_size} ranks x data.batch_size {self.batch_size}: {e}") from None
            if rows > self._lo and self.drop_last:
                raise DataError(f"stream state says {rows} rows of each partition done, more than this split's "
                                f"{self._lo}; the data set changed since the checkpoint")
        else:
            if replaced and self.rank == 0:  # a refreshed data set may go on from an epoch boundary, not silently
                log.warning("%s: split '%s' is not the data the checkpoint was trained on (its shards' checksums "
                            "differ: fingerprint %s -> %s); the run goes on from epoch %s with the data there now",
                            self.url, self.split, state["fingerprint"], self.fingerprint, state["epoch"])
            # An epoch boundary: keep the run's partitions where this world size can serve them (the
            # order of later epochs is then the uninterrupted run's), else start its own.
            try:
                self._plan(parts, chunk)
            except DataError:
                self._plan(self.partitions, None)
        self.close()  # a reader started ahead belongs to the position being replaced
        self._epoch, self._rows_done = int(state["epoch"]), rows


def training_stream(url: str, data, seed: int, rank: int = 0, world_size: int = 1) -> ShardStream:
    """The shuffled training split as a run's config (`data`: its `DataConfig`) asks for it: full batches
    only (a step's batch is the same size on every rank), partitioned for an elastic resume."""
    return ShardStream(url, "train", batch_size=data.batch_size, rank=rank, world_size=world_size,
                       modalities=data.modalities or None, seed=seed, shuffle_buffer=data.shuffle_buffer,
                       drop_last=True, nonfinite=data.nonfinite, prefetch=data.prefetch,
                       read_threads=data.read_threads, partitions=data.partitions)


def evaluation_stream(url: str, split: str, data, seed: int, rank: int = 0, world_size: int = 1, *,
                      batch_size: int | None = None, modalities: list[str] | None = None) -> ShardStream:
    """A split in order, every row once (no shuffle, the last batch kept), as evaluation, calibration and
    embedding read it; `batch_size` defaults to `data.eval_batch_size`, `modalities` to `data.modalities`."""
    return ShardStream(url, split, batch_size=batch_size or data.eval_batch_size, rank=rank, world_size=world_size,
                       modalities=modalities or data.modalities or None, seed=seed, shuffle_buffer=0,
                       drop_last=False, nonfinite=data.nonfinite, prefetch=data.prefetch,
                       read_threads=data.read_threads)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch. Arrays viewing Arrow buffers are flagged read-only, but each batch's
    buffers were decoded for this batch alone (a slice shares memory only with other rows), so handing
    them out writable is safe and saves a copy of every feature byte."""
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)
