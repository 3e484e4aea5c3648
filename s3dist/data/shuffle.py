"""Row order within a partition: the streaming shuffle, re-batching, and the output buffers they fill.

* `shuffled_batches`: a seeded `size`-slot eviction buffer, cut into batches, copying most rows once;
* `rebatch`: batches of a given size from blocks of any size (no shuffle);
* `recut`: a partition's batches from a given row on, cut to another batch size (a resume on another
  world size continues the same row sequence with other batches);
* `BufferPool`: output arrays handed back by their consumer, reused for later batches of the same shape.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np


class BufferPool:
    """Output arrays for batches, reused once their consumer hands them back (`give_back`).

    Fresh memory for every batch costs more than the copy into it: each new MOSI-shaped text batch
    (15 MB) is page-faulted in, and the allocator returns freed pages to the OS soon after. Reuse is
    explicit: only arrays handed back are reused, so a batch the consumer keeps is never overwritten,
    and only arrays that own their memory are taken back (a view may share it with rows still pending).
    At most `per_shape` idle arrays are kept per (shape, dtype). Thread-safe: around an epoch boundary
    this epoch's reader and the next one's take arrays at once."""

    def __init__(self, per_shape: int = 16):
        self.per_shape = per_shape
        self._idle: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        return np.empty(shape, dtype)

    def give_back(self, arrays) -> None:
        """Hand arrays back for reuse; the caller must not use them (or any view of them) afterwards.
        Views and arrays not owning their memory (e.g. Arrow's) are ignored."""
        with self._lock:
            for a in arrays:
                if a.base is None and a.flags.owndata and a.flags.writeable:
                    idle = self._idle.setdefault((a.shape, a.dtype.str), [])
                    if len(idle) < self.per_shape and not any(x is a for x in idle):
                        idle.append(a)


_ROW_COPY_BYTES = 2048  # rows at least this wide are copied one by one (cheaper than a gathered temporary)


def shuffled_batches(blocks: Iterator[dict[str, np.ndarray]], size: int, rng: np.random.Generator,
                      batch_size: int, pool: BufferPool | None = None) -> Iterator[dict[str, np.ndarray]]:
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
    bytes are copied once and 14% twice, no decoded block outlives its arrival (a block held until its
    last row left would keep most of the buffer's blocks alive at once), and the output batches come from
    `pool`, where their consumer may hand them back."""
    chunk = min(batch_size, size)
    ahead = 2 * size
    span = ahead + 2 * chunk + size                # arrival times whose slot / destination are kept
    pool = pool or BufferPool()
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
    pool.give_back([*final.values(), *overflow.values()])
    for j in range(emitted, (arrived - 1) // batch_size + 1):
        out = pending.pop(j)
        rows = min(batch_size, arrived - j * batch_size)
        yield out if rows == batch_size else {k: v[:rows] for k, v in out.items()}


def rebatch(blocks: Iterator[dict[str, np.ndarray]], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
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


def recut(batches: Iterator[dict[str, np.ndarray]], skip: int, size: int, pool: BufferPool,
          ) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `batches` after the first `skip`, cut into `size`-row batches (the last may be short).

    Where nothing needs cutting (the same batch size, `skip` a multiple of it) the input batches pass
    through untouched; skipped batches go back to `pool`. Otherwise every output batch is a fresh copy
    (from `pool`) and the input batches are handed back once copied: a view would share memory with
    rows its consumer has not been given yet."""
    batches = iter(batches)
    for b in batches:
        n = len(b["id"])
        if skip >= n:
            skip -= n
            pool.give_back(b.values())
            continue
        if skip == 0 and n == size:
            yield b
            continue
        # From here on the cut differs from the input's: copy.
        yield from _copy_cut(_chain_first(b, skip, batches), size, pool)
        return


def _chain_first(first: dict[str, np.ndarray], skip: int, rest: Iterator) -> Iterator[tuple[dict, int]]:
    yield first, skip
    for b in rest:
        yield b, 0


def _copy_cut(pieces: Iterator[tuple[dict, int]], size: int, pool: BufferPool) -> Iterator[dict[str, np.ndarray]]:
    out: dict[str, np.ndarray] | None = None
    filled = 0
    for b, start in pieces:
        n = len(b["id"])
        while start < n:
            if out is None:
                out = {k: pool.get((size, *v.shape[1:]), v.dtype) for k, v in b.items()}
            m = min(n - start, size - filled)
            for k, v in b.items():
                out[k][filled:filled + m] = v[start:start + m]
            filled += m
            start += m
            if filled == size:
                yield out
                out, filled = None, 0
        pool.give_back(b.values())
    if out is not None and filled:
        yield {k: v[:filled] for k, v in out.items()}
