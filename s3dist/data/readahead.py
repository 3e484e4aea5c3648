"""Read-ahead: items produced by a background thread ahead of their consumer.

The stream's readers (one per partition, plus parallel shard decoders) and the next epoch's reader
are `Prefetcher`s. Parquet decoding (Arrow) and numpy's large copies release the GIL, so producing the
next items overlaps whatever the consumer does with this one. Every reader still running at interpreter
exit is stopped and joined first (`close_live_readers`).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def stop_ahead(box: list, wait: bool = False) -> None:
    """Stop the reader in `box` (a ShardStream's read-ahead slot); also its finalizer, hence no join
    unless asked (a finalizer may run in any thread)."""
    ahead, box[0] = box[0], None
    if ahead is not None:
        ahead[1].close(wait=wait)


class Prefetcher:
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
def close_live_readers() -> None:
    for reader in list(_LIVE_READERS):
        reader.close()


def prefetched(items: Iterator, depth: int) -> Iterator:
    """`items` through a `Prefetcher` of `depth` (0: in the caller's thread)."""
    if depth <= 0:
        yield from items
    else:
        yield from Prefetcher(items, depth)
