"""The synthetic generator, the data-set writer and ShardStream in one process: shapes, the
generator's ground truth, equal batch counts per rank, exactly-once evaluation, deterministic
shuffling, exact resume, and every bad-input error message."""

from __future__ import annotations

import functools
import json
import operator
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from s3dist.config import SynthConfig
from s3dist.data import DataError
from s3dist.data.manifest import LabelSpec, read_manifest
from s3dist.data.stream import ShardStream
from s3dist.data.synth import generate, sample_arrays
from s3dist.data.writer import SplitArrays, write_dataset

SMALL = {"num_train": 200, "num_val": 50, "num_test": 40, "num_concepts": 6, "seq_len": 8, "modality_dims": [5, 4, 3, 2],
             "rows_per_shard": 40}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("synth") / "ds")
    generate(url, SynthConfig(**SMALL))
    return url


def ids_of(stream) -> list[list[int]]:
    return [b.ids.tolist() for b in stream]


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def test_synth_manifest_columns_and_ground_truth(synth):
    """Names text/audio/vision/m3, [T, D] shapes, front padding, at least one active concept per sample,
    label = any of the first label_concepts concepts, and the stream's batches agree with the manifest."""
    m = read_manifest(synth)
    assert list(m.modalities) == ["text", "audio", "vision", "m3"]
    assert m.modalities["m3"].shape == [8, 2] and m.num_concepts == 6
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 200, "val": 50, "test": 40}
    assert len(m.splits["train"].files) == 5
    batch = next(iter(ShardStream(synth, "train", batch_size=200)))
    c = batch.concepts.bool()
    assert c.any(1).all()
    assert torch.equal(batch.labels, c[:, :2].any(1).long())
    mask = batch.masks["text"]
    assert mask[:, -1].all() and (mask.sum(1) >= 4).all()
    assert torch.equal(mask.int().diff(dim=1).clamp(max=0), torch.zeros(200, 7, dtype=torch.int32))  # no gaps
    assert (batch.features["audio"][~batch.masks["audio"]] == 0).all()
    assert all(torch.equal(batch.masks[x], mask) for x in m.modalities)


def test_synth_seeded_and_mixing_independent_of_sample_count():
    """The same seed gives the same data; more samples leave the first samples' concepts and mixing alone
    only through the sample stream, so the mixing weights (fixed generator) stay fixed across sizes."""
    a = sample_arrays(SynthConfig(**SMALL))
    b = sample_arrays(SynthConfig(**SMALL))
    assert all(np.array_equal(a["features"][k], b["features"][k]) for k in a["features"])
    c = sample_arrays(SynthConfig(**{**SMALL, "seed": 1}))
    assert not np.array_equal(a["features"]["text"], c["features"]["text"])


def test_synth_default_is_fast(tmp_path):
    """The default configuration (4096/512/1024 rows, T=16) generates and writes within a few seconds."""
    start = time.perf_counter()
    generate(str(tmp_path / "d"), SynthConfig())
    assert time.perf_counter() - start < 10.0


def test_synth_modalities_share_concepts_not_nuisance():
    """With noise off, samples with identical concepts and lengths differ across samples only through
    modality-private nuisance: nuisance_scale=0 makes them identical, a positive scale does not."""
    base = {**SMALL, "noise_std": 0.0, "num_concepts": 2, "concept_rate": 0.5}
    clean = sample_arrays(SynthConfig(**base, nuisance_scale=0.0))
    noisy = sample_arrays(SynthConfig(**base, nuisance_scale=1.0))
    key = [tuple(z) + (int(m.sum()),) for z, m in zip(clean["concepts"], clean["mask"])]
    first: dict = {}
    pairs = []
    for idx, k in enumerate(key):
        if k in first:
            pairs.append((first[k], idx))
        first.setdefault(k, idx)
    assert pairs
    i, j = pairs[0]
    np.testing.assert_allclose(clean["features"]["text"][i], clean["features"]["text"][j], atol=1e-6)
    assert not np.allclose(noisy["features"]["text"][i], noisy["features"]["text"][j])


# ---------------------------------------------------------------------------------------------
# Batches, ranks, shuffling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 5])
def test_train_ranks_get_equal_full_batches_and_disjoint_rows(synth, world):
    """drop_last=True: every rank yields exactly batches_per_epoch full batches and ranks never share a
    row, both when datasets splits by rows (5 shards, 2 ranks) and by whole shards (5 shards, 5 ranks)."""
    streams = [ShardStream(synth, "train", batch_size=16, rank=r, world_size=world, shuffle_buffer=32, seed=1)
               for r in range(world)]
    bpe = {s.batches_per_epoch for s in streams}
    assert len(bpe) == 1
    got = [ids_of(s) for s in streams]
    assert len({len(g) for g in got}) == 1 and len(got[0]) == streams[0].batches_per_epoch
    assert all(len(b) == 16 for g in got for b in g)
    flat = [i for g in got for b in g for i in b]
    assert len(flat) == len(set(flat))


def test_eval_covers_every_row_once_with_equal_batch_counts(tmp_path):
    """drop_last=False with unequal shards: each row of the split appears exactly once across ranks, and
    every rank yields the same number of batches, padding with empty (B = 0) batches of the right shapes."""
    cfg = SynthConfig(**{**SMALL, "num_val": 70, "rows_per_shard": 30})  # val: 30 + 30 + 10 rows
    url = str(tmp_path / "ds")
    generate(url, cfg)
    streams = [ShardStream(url, "val", batch_size=8, rank=r, world_size=3, drop_last=False) for r in range(3)]
    batches = [list(s) for s in streams]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == streams[0].batches_per_epoch
    seen = sorted(i for bs in batches for b in bs for i in b.ids.tolist())
    assert seen == list(range(200, 270))
    empty = [b for bs in batches for b in bs if len(b) == 0]
    assert empty, "the rank holding the 10-row shard must pad with empty batches"
    e = empty[0]
    assert e.features["text"].shape == (0, 8, 5) and e.masks["m3"].shape == (0, 8)
    assert e.concepts.shape == (0, 6) and e.labels.dtype == torch.int64


def test_shuffle_is_seeded_per_epoch_and_unshuffled_keeps_file_order(synth):
    """Shuffled order is reproducible for (seed, epoch), differs between epochs and seeds, and covers the
    same rows; shuffle_buffer=0 yields rows in file order."""
    def epochs(seed, n=2):
        s = ShardStream(synth, "train", batch_size=20, shuffle_buffer=64, seed=seed)
        return [functools.reduce(operator.iadd, ids_of(s), []) for _ in range(n)]

    a, b = epochs(5), epochs(5)
    assert a == b and a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == list(range(200))
    assert epochs(6, 1)[0] != a[0]
    plain = ShardStream(synth, "train", batch_size=20)
    assert functools.reduce(operator.iadd, ids_of(plain), []) == list(range(200))


def _eviction_buffer(ids: list[int], size: int, batch_size: int, seed: int) -> tuple[list[int], list[int]]:
    """The shuffle's definition, one row at a time: the first `size` rows fill the buffer, every later
    row takes the next scheduled slot (drawn min(batch_size, size) at a time without replacement) and
    evicts its occupant. Returns (evicted rows in order, rows left in the buffer)."""
    rng = np.random.default_rng(seed)
    buf, out, picks = [], [], []
    for x in ids:
        if len(buf) < size:
            buf.append(x)
            continue
        if not picks:
            picks = rng.choice(size, size=min(batch_size, size), replace=False).tolist()
        s = picks.pop(0)
        out.append(buf[s])
        buf[s] = x
    return out, buf


@pytest.mark.parametrize("rows,size,batch_size,blocks", [
    (300, 64, 16, [16]), (300, 40, 16, [7, 33, 1]), (500, 128, 32, [50, 3]), (37, 64, 8, [5]),
    (64, 64, 64, [64]), (250, 5, 16, [16]), (1000, 96, 20, [17, 40]), (0, 8, 4, [4])])
def test_shuffle_scatter_equals_the_eviction_buffer(rows, size, batch_size, blocks):
    """The scatter-on-arrival shuffle emits exactly the rows a plain eviction buffer evicts, in the same
    order, then the buffer's leftovers permuted; every row once, whole batches except the last, every
    column of a row kept together, whatever the input block sizes."""
    from s3dist.data.shuffle import shuffled_batches

    def input_blocks():
        start, k = 0, 0
        while start < rows:
            n = blocks[k % len(blocks)]
            ids = np.arange(start, min(start + n, rows))
            yield {"id": ids, "x": np.repeat(ids[:, None], 300, axis=1).astype(np.float32) * 2,
                   "m": (ids[:, None] % 3 == np.arange(4)[None, :])}
            start, k = start + n, k + 1

    out = list(shuffled_batches(input_blocks(), size, np.random.default_rng(7), batch_size))
    got = np.concatenate([b["id"] for b in out]).tolist() if out else []
    evicted, left = _eviction_buffer(list(range(rows)), size, batch_size, seed=7)
    assert got[:len(evicted)] == evicted
    assert sorted(got[len(evicted):]) == sorted(left) and sorted(got) == list(range(rows))
    assert [len(b["id"]) for b in out[:-1]] == [batch_size] * (len(out) - 1)
    for b in out:
        assert (b["x"] == b["id"][:, None] * 2).all()
        assert (b["m"] == (b["id"][:, None] % 3 == np.arange(4)[None, :])).all()


def test_batch_memory_is_reused_only_once_handed_back(synth):
    """Output arrays are reused only after `Batch.release()`: batches kept (never released) keep their
    contents through the rest of the epoch and the next one, while released batches' memory serves
    later batches; releasing twice, or releasing a batch of unshuffled (Arrow-backed) rows, is harmless."""
    s = ShardStream(synth, "train", batch_size=8, shuffle_buffer=24, seed=3, prefetch=0)
    kept = [(b, b.ids.clone(), b.features["text"].clone()) for b in s]
    _ = ids_of(s)
    for b, ids, text in kept:
        assert torch.equal(b.ids, ids) and torch.equal(b.features["text"], text)
    held = {b.features["text"].data_ptr() for b, _, _ in kept}
    ptrs, alive = [], []  # kept alive, so only the pool (not the allocator) can give their memory again
    for b in s:
        ptrs.append(b.features["text"].data_ptr())
        alive.append(b)
        b.release()
        b.release()
    assert len(set(ptrs)) < len(ptrs) / 2 and not set(ptrs) & held
    want = ids_of(ShardStream(synth, "train", batch_size=8, shuffle_buffer=24, seed=3, prefetch=0))
    again = ShardStream(synth, "train", batch_size=8, shuffle_buffer=24, seed=3, prefetch=2)
    got = []
    for b in again:
        got.append(b.ids.tolist())
        b.release()
    assert got == want
    plain = ShardStream(synth, "train", batch_size=8)
    for b in plain:
        b.release()


def test_prefetch_keeps_order_and_stops_with_the_consumer(synth):
    """Reading ahead in a thread changes nothing the consumer sees (same batches, same resume state),
    and a consumer that stops early leaves no reader thread behind."""
    kw = {"batch_size": 16, "shuffle_buffer": 48, "seed": 2}
    a, b = ShardStream(synth, "train", prefetch=0, **kw), ShardStream(synth, "train", prefetch=3, **kw)
    assert ids_of(a) + ids_of(a) == ids_of(b) + ids_of(b) and a.state_dict() == b.state_dict()
    b.close()  # b read two whole epochs, so it reads the third ahead (see the next test)
    it = iter(ShardStream(synth, "train", prefetch=2, **kw))
    next(it)
    it.close()
    assert not _readers_left()

    from s3dist.data.readahead import prefetched

    def failing():
        yield 1
        yield 2
        raise DataError("shard x.parquet went away")

    got = []
    with pytest.raises(DataError, match="x.parquet went away"):
        for x in prefetched(failing(), 4):
            got.append(x)
    assert got == [1, 2]


def test_readers_closed_in_any_order_stop_without_hanging():
    """Readers chained into each other (parallel shard readers feeding the shuffle's reader) can be
    closed in any order, as the exit hook does: closing the inner one first makes the outer one's
    producer fail instead of waiting forever, and a consumer still iterating a reader stopped from
    elsewhere gets an error, not a silently shortened epoch."""
    import threading

    from s3dist.data.readahead import Prefetcher
    inner = Prefetcher(iter(range(10**6)), 2)
    outer = Prefetcher((x for x in inner), 2)
    it = iter(outer)
    assert next(it) == 0
    closer = threading.Thread(target=lambda: (inner.close(), outer.close()))
    closer.start()
    closer.join(timeout=20)
    assert not closer.is_alive() and not inner._thread.is_alive() and not outer._thread.is_alive()
    with pytest.raises(RuntimeError, match="stopped while its items were still being consumed"):
        list(it)


def _readers_left() -> list:
    """Reader threads still alive once stopped ones had time to finish (a stream collected without
    close() signals its reader, which ends at its next hand-over)."""
    import gc
    import threading
    gc.collect()
    threads = [t for t in threading.enumerate() if t.name == "s3dist-data-prefetch"]
    for t in threads:
        t.join(timeout=2)
    return [t for t in threads if t.is_alive()]


def _reading_ahead(stream) -> bool:
    ahead = stream._ahead_box[0]
    return ahead is not None and ahead[1]._thread.is_alive()


def test_next_epoch_is_read_ahead_without_changing_any_batch(synth):
    """A training stream starts reading epoch e+1 while the last batches of epoch e are handed out, so
    the next epoch's first batch is ready when asked for. Nothing the consumer sees changes (batches and
    states over three epochs equal those of a stream without any prefetch), loading a state drops the
    reader started ahead, close() stops it, and an evaluation stream (drop_last=False) starts none."""
    kw = {"batch_size": 16, "shuffle_buffer": 48, "seed": 2}
    ref = ShardStream(synth, "train", prefetch=0, **kw)
    s = ShardStream(synth, "train", prefetch=2, **kw)
    assert s.prefetch_next_epoch and not ref.prefetch_next_epoch
    want = [ids_of(ref) for _ in range(3)]
    assert ids_of(s) == want[0] and s.state_dict() == {**ref.state_dict(), "epoch": 1}
    assert _reading_ahead(s)  # epoch 1's reader, started before epoch 0 ended

    opened = []
    real = s._numpy_batches
    s._numpy_batches = lambda epoch, skip=0: (opened.append(epoch), real(epoch, skip))[1]
    it = iter(s)
    assert next(it).ids.tolist() == want[1][0] and opened == []  # served by the reader started ahead
    assert [b.ids.tolist() for b in it] == want[1][1:] and opened == [2]
    assert ids_of(s) == want[2] and opened == [2, 3]
    del s._numpy_batches, real  # the counting wrapper holds a reference to the stream

    # A state loaded while a reader runs ahead replaces it: the replay is exact.
    mid = ShardStream(synth, "train", prefetch=0, **kw)
    first = next(iter(mid))
    state = mid.state_dict()
    assert _reading_ahead(s)
    s.load_state_dict(state)
    assert not _reading_ahead(s)
    assert [first.ids.tolist()] + ids_of(s) == want[0]
    s.close()
    assert not _reading_ahead(s)

    ev = ShardStream(synth, "train", prefetch=2, drop_last=False, **kw)
    assert not ev.prefetch_next_epoch
    ids_of(ev)
    assert not _reading_ahead(ev)

    # At interpreter exit, readers of streams nobody closed are stopped and joined (a daemon thread
    # still decoding while Python tears down aborts the process).
    from s3dist.data.readahead import close_live_readers
    assert ids_of(s) == want[1]
    thread = s._ahead_box[0][1]._thread
    assert thread.is_alive()
    close_live_readers()
    assert not thread.is_alive()
    assert ids_of(s) == want[2]  # a reader stopped that way is not used: the epoch is read anew
    del s, ref, mid, ev, it
    assert not _readers_left()  # and a training stream dropped without close() stops its reader


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    """8 shards of 37 rows and a last one of 24: shard ends fall inside batches and row groups."""
    n = 283
    rng = np.random.default_rng(0)
    split = SplitArrays(features={"seq": rng.standard_normal((n, 3, 4), dtype=np.float32),
                                  "vec": rng.standard_normal((n, 5), dtype=np.float32)}, labels=np.arange(n) % 3)
    url = str(tmp_path_factory.mktemp("uneven") / "ds")
    write_dataset(url, name="uneven", splits={"train": split}, label=LabelSpec("multiclass", 3), source="t",
                  rows_per_shard=37)
    return url


@pytest.mark.parametrize("world,shuffle,drop_last", [(1, 32, True), (1, 0, False), (2, 32, True), (2, 0, False),
                                                     (4, 16, False)])
def test_parallel_readers_hand_out_the_same_batches(uneven, world, shuffle, drop_last):
    """Shards decoded by 2 or 3 reader threads give exactly the batches (rows, order, feature values) of
    one reader, for every rank, shuffled or not, over two epochs; and the readers really run: each
    opens its own part of the rank's shards, together all of them once."""
    kw = {"batch_size": 10, "shuffle_buffer": shuffle, "drop_last": drop_last, "world_size": world, "seed": 4}

    def batches(stream):
        return [(b.ids.tolist(), b.features["seq"].clone(), b.features["vec"].clone()) for b in stream]

    for rank in range(world):
        one = ShardStream(uneven, "train", rank=rank, read_threads=1, **kw)
        want = batches(one) + batches(one)
        for k in (2, 3):
            s = ShardStream(uneven, "train", rank=rank, read_threads=k, **kw)
            opened: list[list[str]] = []
            real = s._reader._read
            s._reader._read = lambda files, part, parts: (opened.append(files), real(files, part, parts))[1]
            got = batches(s) + batches(s)
            s.close()
            del s._reader._read, real
            assert [g[0] for g in got] == [w[0] for w in want]
            assert all(torch.equal(g[1], w[1]) and torch.equal(g[2], w[2]) for g, w in zip(got, want))
            readers = min(k, 8 // world)
            epoch0 = opened[:readers]   # the next epoch's readers may have opened after these
            assert len(epoch0) == readers and sorted(f for fs in epoch0 for f in fs) == sorted(read_manifest(
                uneven).splits["train"].files)


def test_parallel_readers_only_where_whole_shards_are_split(uneven):
    """One reader where split_dataset_by_node splits rows (shard count not a multiple of the world size),
    where prefetch=0 asks for reading in the caller's thread, and never more than a rank's shards."""
    assert ShardStream(uneven, "train", batch_size=10, read_threads=4)._readers(8) == 4
    assert ShardStream(uneven, "train", batch_size=10, read_threads=4, world_size=4)._readers(8) == 2
    assert ShardStream(uneven, "train", batch_size=10, read_threads=4, world_size=3)._readers(8) == 1
    assert ShardStream(uneven, "train", batch_size=10, read_threads=4, prefetch=0)._readers(8) == 1
    with pytest.raises(DataError, match="read_threads = 0 must be >= 1"):
        ShardStream(uneven, "train", batch_size=10, read_threads=0)


def test_a_shard_lost_while_reading_in_parallel_stops_every_reader(tmp_path, uneven):
    """A shard that disappears after the stream opened raises in the consumer, naming the file, and
    leaves no reader thread behind."""
    url = copy_dataset(uneven, tmp_path / "a")
    s = ShardStream(url, "train", batch_size=10, shuffle_buffer=16, read_threads=3)
    (Path(url) / "train-00005.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00005\.parquet"):
        ids_of(s)
    s.close()
    assert not _readers_left()


def test_batch_to_moves_every_tensor(synth):
    """Batch.to (what the trainer calls on every batch) moves ids, labels, every feature, mask and the
    concepts; on the device it is already on, it is a no-op. ('meta' stands in for CUDA here.)"""
    b = next(iter(ShardStream(synth, "train", batch_size=8)))
    assert b.to("cpu") is b
    m = b.to("meta")
    tensors = [m.ids, m.labels, m.concepts, *m.features.values(), *m.masks.values()]
    assert all(t.device.type == "meta" for t in tensors) and len(tensors) == 3 + 2 * len(b.features)
    assert m.features["text"].shape == b.features["text"].shape and m.concepts.dtype == torch.uint8


def test_modalities_narrowed_and_non_sequence_modality_gets_t1(tmp_path):
    """`modalities` narrows the batch; a [D] modality arrives as [B, 1, D] with an all-True mask."""
    n = 12
    split = SplitArrays(features={"vec": np.ones((n, 3)), "seq": np.zeros((n, 2, 4))}, labels=np.arange(n) % 3)
    url = str(tmp_path / "v")
    write_dataset(url, name="v", splits={"train": split}, label=LabelSpec("multiclass", 3), source="t")
    b = next(iter(ShardStream(url, "train", batch_size=4, modalities=["vec"])))
    assert list(b.features) == ["vec"] and b.features["vec"].shape == (4, 1, 3)
    assert b.masks["vec"].all() and b.masks["vec"].shape == (4, 1) and b.concepts is None


def test_memory_filesystem_roundtrip():
    """Any fsspec URL works: generate into memory:// and stream from it."""
    url = "memory://s3dist-test/synth"
    fs = fsspec.filesystem("memory")
    if fs.exists("/s3dist-test"):
        fs.rm("/s3dist-test", recursive=True)
    generate(url, SynthConfig(**SMALL))
    s = ShardStream(url, "test", batch_size=10, world_size=2, rank=1, drop_last=False)
    assert sum(len(b) for b in s) == 20
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("/s3dist-test", detail=False)] == ["synth"]  # no temp left


# ---------------------------------------------------------------------------------------------
# Resume (single process; the 2-rank version is in test_data_resume_multirank.py)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 3, 11])
def test_resume_after_n_batches_continues_with_batch_n_plus_1(synth, tmp_path, cut):
    """state_dict after n batches (saved with torch.save, loaded weights_only) resumes with batch n+1 of
    the same epoch in a fresh stream, then continues into the next epoch as an uninterrupted run does."""
    kw = {"batch_size": 16, "shuffle_buffer": 48, "seed": 9}
    ref = ShardStream(synth, "train", **kw)
    full = ids_of(ref) + ids_of(ref)
    first = ShardStream(synth, "train", **kw)
    it = iter(first)
    taken = [next(it).ids.tolist() for _ in range(cut)]
    torch.save(first.state_dict(), tmp_path / "s.pt")
    resumed = ShardStream(synth, "train", **kw)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    rest = ids_of(resumed) + ids_of(resumed)
    assert len(taken) == cut and taken + rest == full


def test_resume_at_epoch_end_moves_to_next_epoch(synth):
    """A state saved after the last batch of an epoch resumes at the start of the next epoch."""
    kw = {"batch_size": 16, "shuffle_buffer": 48, "seed": 9}
    ref = ShardStream(synth, "train", **kw)
    epoch0, epoch1 = ids_of(ref), ids_of(ref)
    s = ShardStream(synth, "train", **kw)
    it = iter(s)
    for _ in range(s.batches_per_epoch):
        next(it)
    state = s.state_dict()
    assert state["batches_done"] == s.batches_per_epoch and state["epoch"] == 0
    r = ShardStream(synth, "train", **kw)
    r.load_state_dict(state)
    assert ids_of(r) == epoch1 and len(epoch0) == len(epoch1)


def _epoch_ids(streams, n=None) -> list[list[int]]:
    """Per rank (stream), the ids of its next `n` batches of this epoch (all of them with n=None)."""
    out = []
    for s in streams:
        it, got = iter(s), []
        for b in it:
            got.append(b.ids.tolist())
            if n is not None and len(got) == n:
                break
        out.append(got)
    return out


@pytest.mark.parametrize("parts,before,after", [(2, 2, 1), (4, 2, 1), (4, 2, 4), (4, 1, 2)])
def test_resume_on_another_world_size_neither_repeats_nor_skips(uneven, parts, before, after):
    """`before` ranks take 3 batches and save; the state of rank 0 is loaded by `after` ranks, which
    finish the epoch. Every row an uninterrupted `before`-rank epoch hands out is handed out exactly
    once (the rows dropped at the epoch's end are the same), each partition continues its own row
    sequence (the resumed ranks' rows, in order, are the uninterrupted run's from where it stopped),
    and the next epoch is the uninterrupted run's."""
    kw = {"shuffle_buffer": 32, "seed": 5, "partitions": parts, "prefetch": 1}
    b = 20  # per-rank batch of the first run: q = 20 x before / parts rows of each partition per step
    ref = [ShardStream(uneven, "train", batch_size=b, rank=r, world_size=before, **kw) for r in range(before)]
    full = _epoch_ids(ref)
    next_epoch = _epoch_ids(ref)
    first = [ShardStream(uneven, "train", batch_size=b, rank=r, world_size=before, **kw) for r in range(before)]
    taken = _epoch_ids(first, 3)
    state = first[0].state_dict()
    assert all(s.state_dict()["rows_done"] == state["rows_done"] for s in first)
    b2 = b * before // after  # the same global batch; any batch giving whole rows per partition works
    resumed = [ShardStream(uneven, "train", batch_size=b2, rank=r, world_size=after, **kw) for r in range(after)]
    for s in resumed:
        s.load_state_dict(state)
    rest = _epoch_ids(resumed)
    seen = [i for rank in taken + rest for batch in rank for i in batch]
    want = [i for rank in full for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(want)
    assert len(set(want)) < 283 or parts == 4  # some rows dropped at the epoch's end, the same ones
    # Partition p's rows in order: before the cut from its rank in the first run, after from its new rank.
    q, q2 = b * before // parts, b2 * after // parts

    def partition_rows(ranks, world, step_rows, p):
        j = p // world  # p's place among its rank's partitions
        return [i for batch in ranks[p % world] for i in batch[j * step_rows:(j + 1) * step_rows]]

    for p in range(parts):
        assert (partition_rows(taken, before, q, p) + partition_rows(rest, after, q2, p)
                == partition_rows(full, before, q, p))
    assert sorted(i for r in _epoch_ids(resumed) for bb in r for i in bb) == sorted(
        i for r in next_epoch for bb in r for i in bb)


def test_resume_with_another_batch_size_continues_the_rows(synth):
    """One rank, batch 16 -> 8 mid-epoch: the rows continue where they stopped; the smaller batch
    leaves fewer rows over at the epoch's end, so the 8 rows the 16-row epoch dropped come last."""
    kw = {"shuffle_buffer": 48, "seed": 9}
    ref = [i for b in ShardStream(synth, "train", batch_size=16, **kw) for i in b.ids.tolist()]
    s = ShardStream(synth, "train", batch_size=16, **kw)
    it = iter(s)
    head = next(it).ids.tolist() + next(it).ids.tolist()
    r = ShardStream(synth, "train", batch_size=8, **kw)
    r.load_state_dict(s.state_dict())
    tail = [i for b in r for i in b.ids.tolist()]
    assert (head + tail)[:len(ref)] == ref and len(head + tail) == 200
    assert not set(tail[len(ref) - len(head):]) & set(ref)


def test_resume_refuses_what_cannot_continue_the_epoch(synth):
    """Mid-epoch: a world size that does not divide the partitions, a global batch that cannot take
    whole rows from every partition, or a changed shuffle are refused, naming the setting; at an epoch
    boundary the same states load."""
    s = ShardStream(synth, "train", batch_size=16, shuffle_buffer=48)
    next(iter(s))
    state = s.state_dict()
    with pytest.raises(DataError, match=r"the checkpoint is in the middle of epoch 0, which cannot go on with 2 ranks "
                                        r"x data.batch_size 16: .*2 ranks cannot share 1 partitions \(data.partitions\)"):
        ShardStream(synth, "train", batch_size=16, world_size=2, shuffle_buffer=48).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_buffer 48 -> 32"):
        ShardStream(synth, "train", batch_size=16, shuffle_buffer=32).load_state_dict(state)
    two = ShardStream(synth, "train", batch_size=16, world_size=2, partitions=2, shuffle_buffer=48)
    next(iter(two))
    with pytest.raises(DataError, match=r"1 x 15 rows \(data.batch_size\) cannot take the same number of rows "
                                        r"from each of 2 partitions"):
        ShardStream(synth, "train", batch_size=15, shuffle_buffer=48).load_state_dict(two.state_dict())
    at_boundary = {**state, "rows_done": 0, "batches_done": 0, "epoch": 1}
    r = ShardStream(synth, "train", batch_size=16, world_size=2, shuffle_buffer=48)
    r.load_state_dict(at_boundary)
    assert r.partitions == 2 and len(ids_of(r)) == r.batches_per_epoch
    with pytest.raises(DataError, match="data.partitions"):
        ShardStream(synth, "train", batch_size=16, world_size=2, partitions=3)


def test_resume_refuses_a_mid_epoch_state_from_another_shuffle_order(synth):
    """A mid-epoch state written by an s3dist whose shuffle orders rows differently (no order_version:
    version 1) is refused, since replaying the epoch would repeat and skip rows; at an epoch boundary
    it loads."""
    kw = {"batch_size": 16, "shuffle_buffer": 48, "seed": 9}
    s = ShardStream(synth, "train", **kw)
    next(iter(s))
    old = {k: v for k, v in s.state_dict().items()  # as s3dist <= 0.1 wrote it
           if k not in ("order_version", "rows_done", "partitions", "shuffle_chunk")}
    with pytest.raises(DataError, match="order_version 1 -> 2"):
        ShardStream(synth, "train", **kw).load_state_dict(old)
    r = ShardStream(synth, "train", **kw)
    r.load_state_dict({**old, "batches_done": 0, "epoch": 1})
    ref = ShardStream(synth, "train", **kw)
    ids_of(ref)
    assert ids_of(r) == ids_of(ref)


def test_resume_on_a_data_set_replaced_at_the_same_path(synth, tmp_path, caplog):
    """A data set generated anew at the run's path (same shapes and row counts, other rows): a mid-epoch state
    is refused, naming the split and both fingerprints, since its epoch cannot be replayed; at an epoch
    boundary the stream goes on with the new rows and says so once, on rank 0. The same data loads silently."""
    import logging

    other = str(tmp_path / "other")
    generate(other, SynthConfig(**SMALL, seed=SynthConfig().seed + 1))
    kw = {"batch_size": 16, "shuffle_buffer": 48}
    s = ShardStream(synth, "train", **kw)
    next(iter(s))
    state = s.state_dict()
    assert state["fingerprint"] != ShardStream(other, "train", **kw).fingerprint
    with pytest.raises(DataError, match=rf"split 'train' is not the data the checkpoint was trained on .*"
                                        rf"fingerprint {state['fingerprint']} -> \w+\), and the checkpoint is in "
                                        r"the middle of epoch 0"):
        ShardStream(other, "train", **kw).load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        ShardStream(synth, "train", **kw).load_state_dict(state)
        assert not caplog.records
        r = ShardStream(other, "train", **kw)
        r.load_state_dict({**state, "rows_done": 0, "batches_done": 0, "epoch": 1})
        ShardStream(other, "train", rank=1, world_size=2, batch_size=8).load_state_dict(
            {**state, "rows_done": 0, "batches_done": 0, "epoch": 1})
    assert len(caplog.records) == 1 and "goes on from epoch 1 with the data there now" in caplog.text
    assert len(ids_of(r)) == r.batches_per_epoch
    # a state written before the fingerprint existed cannot tell: it loads mid-epoch as before
    ShardStream(other, "train", **kw).load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def copy_dataset(src: str, dst: Path) -> str:
    fs = fsspec.filesystem("file")
    fs.copy(src, str(dst), recursive=True)
    return str(dst)


def rewrite_manifest(url: str, edit) -> None:
    p = Path(url) / "manifest.json"
    doc = json.loads(p.read_text())
    edit(doc)
    p.write_text(json.dumps(doc))


def rewrite_shard(url: str, fname: str, edit_table) -> None:
    """Replace a shard and fix its checksum, so the damage is only what `edit_table` does."""
    import hashlib
    path = Path(url) / fname
    table = edit_table(pq.read_table(path))
    pq.write_table(table, path)
    rewrite_manifest(url, lambda d: d["splits"]["train"]["checksums"].__setitem__(
        fname, hashlib.sha256(path.read_bytes()).hexdigest()))


def test_missing_manifest_bad_json_missing_key(tmp_path, synth):
    """Manifest errors name the file: missing, not JSON, missing key; and a malformed field by its place."""
    with pytest.raises(DataError, match=r"nothing/manifest\.json not found"):
        ShardStream(str(tmp_path / "nothing"), "train", batch_size=4)
    url = copy_dataset(synth, tmp_path / "c")
    (Path(url) / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json is not valid JSON"):
        read_manifest(url)
    url = copy_dataset(synth, tmp_path / "d")
    rewrite_manifest(url, lambda d: d.pop("label"))
    with pytest.raises(DataError, match=r"manifest\.json: missing key 'label'"):
        read_manifest(url)
    url = copy_dataset(synth, tmp_path / "e")
    rewrite_manifest(url, lambda d: d["splits"]["val"].update(files="val-00000.parquet"))
    with pytest.raises(DataError, match=r"splits\.val\.files = 'val-00000\.parquet' must be a list of shard file"):
        read_manifest(url)
    rewrite_manifest(url, lambda d: d["splits"].update(val={**d["splits"]["val"], "files": [], "rows": "many"}))
    with pytest.raises(DataError, match=r"malformed manifest at 'splits\.val' \(ValueError: invalid literal"):
        read_manifest(url)


def test_a_protocol_whose_fsspec_package_is_missing_is_named(monkeypatch):
    """fsspec's ImportError for a protocol whose package is not installed becomes a DataError naming the URL
    and fsspec's own hint (which package), not a traceback from inside a rank."""
    import fsspec.core

    def missing_backend(url, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing_backend)
    with pytest.raises(DataError, match=r"'s3://bucket/ds': Install s3fs to access S3 \(fsspec needs that package"):
        read_manifest("s3://bucket/ds")


def test_missing_and_corrupt_shards_and_checksum(tmp_path, synth):
    """A missing shard, a changed shard (checksum) and a corrupt Parquet file each name the file."""
    url = copy_dataset(synth, tmp_path / "a")
    (Path(url) / "train-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"train-00002\.parquet \(split 'train'\) is missing"):
        ShardStream(url, "train", batch_size=4)
    url = copy_dataset(synth, tmp_path / "b")
    with open(Path(url) / "train-00001.parquet", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    with pytest.raises(DataError, match=r"train-00001\.parquet: checksum mismatch"):
        ShardStream(url, "train", batch_size=4)
    url = copy_dataset(synth, tmp_path / "c")
    junk = Path(url) / "train-00003.parquet"
    junk.write_bytes(b"this is not parquet at all")
    import hashlib
    rewrite_manifest(url, lambda d: d["splits"]["train"]["checksums"].__setitem__(
        "train-00003.parquet", hashlib.sha256(junk.read_bytes()).hexdigest()))
    with pytest.raises(DataError, match=r"train-00003\.parquet is not a readable Parquet file"):
        ShardStream(url, "train", batch_size=4)


def test_shape_disagreeing_with_manifest(tmp_path, synth):
    """A manifest shape that disagrees with the stored column names the file, column and both shapes."""
    url = copy_dataset(synth, tmp_path / "a")
    rewrite_manifest(url, lambda d: d["modalities"]["audio"].__setitem__("shape", [8, 7]))
    with pytest.raises(DataError, match=r"train-00000\.parquet: column 'audio' is fixed_size_list.*\[56\].*\[8, 7\]"):
        ShardStream(url, "train", batch_size=4)


def test_nonfinite_features_error_with_count_or_zero(tmp_path, synth, capsys):
    """NaN / inf in features of a manifest without counts (s3dist <= 0.1, or hand-made): found per batch
    while streaming, an error with the count and row ids, or zeros with nonfinite='zero'."""
    url = copy_dataset(synth, tmp_path / "a")

    def poison(t: pa.Table) -> pa.Table:
        flat = t.column("text").combine_chunks().flatten().to_numpy().copy()
        flat[[0, 1, 7]] = [np.nan, np.inf, -np.inf]
        col = pa.FixedSizeListArray.from_arrays(pa.array(flat), 8 * 5)
        return t.set_column(t.schema.get_field_index("text"), "text", col)

    rewrite_shard(url, "train-00000.parquet", poison)
    rewrite_manifest(url, lambda d: d["splits"]["train"].pop("nonfinite"))
    from s3dist.cli import main
    assert main(["data", "inspect", url]) == 0
    assert "NaN/inf    train: not counted" in capsys.readouterr().out
    s = ShardStream(url, "train", batch_size=40)
    assert s._finite_check == set(s.modalities)  # not counted: every batch is checked
    with pytest.raises(DataError, match=r"3 NaN/inf values in modality 'text' \(rows with id \[0\]\)"):  # one row
        list(s)
    b = next(iter(ShardStream(url, "train", batch_size=40, nonfinite="zero")))
    assert torch.isfinite(b.features["text"]).all() and (b.features["text"][0, 0, :2] == 0).all()


def test_nonfinite_counted_when_written_stop_the_stream_at_open(tmp_path, capsys):
    """The writer counts NaN / inf per shard and modality: import warns, `data inspect` shows the counts,
    the stream stops when it opens (count, row ids, shard) before any batch, nonfinite='zero' replaces
    them; modalities counted clean are not checked per batch."""
    from s3dist.cli import main
    n = 30
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((n, 4, 3)).astype(np.float32), rng.standard_normal((n, 2)).astype(np.float32)
    x[12, 1, 2], x[13, 0, 0], x[25, 3, 1] = np.nan, np.inf, np.nan
    np.save(tmp_path / "x.npy", x), np.save(tmp_path / "v.npy", v), np.save(tmp_path / "y.npy", np.arange(n) % 2)
    assert main(["data", "import-arrays", "--modality", f"x={tmp_path / 'x.npy'}", "--modality",
                 f"v={tmp_path / 'v.npy'}", "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "i")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "NaN/inf" in line]
    assert warned and all("modality 'x'" in w for w in warned)
    assert sum(int(w.split(" holds ")[1].split()[0]) for w in warned) == 3  # over whichever splits got them

    url = str(tmp_path / "d")
    write_dataset(url, name="d", splits={"train": SplitArrays(features={"x": x, "v": v}, labels=np.arange(n) % 2)},
                  label=LabelSpec("binary", 2), source="t", rows_per_shard=10)
    spec = read_manifest(url).splits["train"]
    assert spec.nonfinite == {"train-00001.parquet": {"x": 2}, "train-00002.parquet": {"x": 1}}
    assert main(["data", "inspect", url]) == 0
    assert "NaN/inf    train: x 3" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"train': 3 NaN/inf values in modality 'x' \(rows with id \[12, 13\] "
                                        r"in train-00001\.parquet and 1 more shard\)"):
        ShardStream(url, "train", batch_size=5)
    clean = ShardStream(url, "train", batch_size=5, modalities=["v"])  # the clean modality alone: fine
    assert clean._finite_check == set()
    z = ShardStream(url, "train", batch_size=5, nonfinite="zero")
    assert z._finite_check == {"x"}
    got = torch.cat([b.features["x"] for b in z])
    assert torch.isfinite(got).all() and len(got) == n and int((got == 0).sum()) >= 3

    # Counted on the float32 values written: a float64 value beyond float32's range is stored as inf.
    big = rng.standard_normal((n, 2))
    big[7, 1] = 1e39
    url2 = str(tmp_path / "f64")
    with np.errstate(over="ignore"):  # numpy's own warning about the cast is not what is tested here
        write_dataset(url2, name="f64", splits={"train": SplitArrays(features={"v": big}, labels=np.arange(n) % 2)},
                      label=LabelSpec("binary", 2), source="t", rows_per_shard=10)
    assert read_manifest(url2).splits["train"].nonfinite == {"train-00000.parquet": {"v": 1}}
    with pytest.raises(DataError, match=r"1 NaN/inf values in modality 'v' \(rows with id \[7\] in train-00000"):
        ShardStream(url2, "train", batch_size=5)


def test_labels_outside_declared_classes(tmp_path, synth):
    """A label outside 0..num_classes-1 names the file, row, id and value."""
    url = copy_dataset(synth, tmp_path / "a")

    def relabel(t: pa.Table) -> pa.Table:
        lab = t.column("label").to_numpy().copy()
        lab[5] = 7
        return t.set_column(t.schema.get_field_index("label"), "label", pa.array(lab))

    rewrite_shard(url, "train-00000.parquet", relabel)
    with pytest.raises(DataError, match=r"train-00000\.parquet row 5 \(id 5\): label 7 is outside the declared 2"):
        ShardStream(url, "train", batch_size=4)


def test_unknown_modality_unknown_split_empty_split(tmp_path, synth):
    """A requested modality the data set lacks, a split it lacks, and an empty split are named."""
    with pytest.raises(DataError, match=r"modality \['speech'\] requested.*has only \['audio', 'm3', 'text', 'vision'\]"):
        ShardStream(synth, "train", batch_size=4, modalities=["text", "speech"])
    with pytest.raises(DataError, match=r"no split 'dev'; the data set has \['test', 'train', 'val'\]"):
        ShardStream(synth, "dev", batch_size=4)
    url = copy_dataset(synth, tmp_path / "a")
    rewrite_manifest(url, lambda d: d["splits"]["val"].update(files=[], rows=0))
    with pytest.raises(DataError, match=r"split 'val' is empty"):
        ShardStream(url, "val", batch_size=4)
    with pytest.raises(DataError, match=r"only 100 rows, fewer than one batch of 128"):
        ShardStream(synth, "train", batch_size=128, world_size=2)


def test_written_columns_are_the_manifests_and_concepts_must_agree(tmp_path):
    """The shards hold exactly the columns `Manifest.columns` describes, in its types (plus `label_raw`
    where given); concepts on some splits only, or without a declared count, are refused by split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s3dist.data.manifest import read_manifest

    n = 6
    arr = SplitArrays(features={"x": np.zeros((n, 3, 2)), "y": np.ones((n, 4))}, labels=np.zeros(n, int),
                      label_raw=np.linspace(0, 1, n), concepts=np.ones((n, 5), np.uint8))
    write_dataset(str(tmp_path / "ds"), name="ds", splits={"train": arr}, label=LabelSpec("binary", 2), source="t",
                  num_concepts=5)
    m = read_manifest(str(tmp_path / "ds"))
    schema = pq.read_schema(tmp_path / "ds" / m.splits["train"].files[0])
    want = m.columns(list(m.modalities))
    assert [c for c in schema.names if c != "label_raw"] == list(want)
    for name, (dtype, size) in want.items():
        typ = pa.from_numpy_dtype(dtype)
        assert schema.field(name).type == (pa.list_(typ, size) if size else typ), name
    assert schema.field("label_raw").type == "double"
    no_concepts = SplitArrays(features={"x": np.zeros((n, 3, 2)), "y": np.ones((n, 4))}, labels=np.zeros(n, int))
    with pytest.raises(DataError, match="split 'test' has no 'concepts' values"):
        write_dataset(str(tmp_path / "a"), name="a", splits={"train": arr, "test": no_concepts},
                      label=LabelSpec("binary", 2), source="t", num_concepts=5)
    with pytest.raises(DataError, match="split 'train' has concept columns but the data set declares no"):
        write_dataset(str(tmp_path / "b"), name="b", splits={"train": arr}, label=LabelSpec("binary", 2), source="t")


def test_atomic_write_failure_leaves_nothing_and_existing_is_kept(tmp_path):
    """A write that fails after shards were written leaves neither the folder nor a temp sibling; an
    existing data set is not overwritten without overwrite=True; unsafe names are refused."""
    n = 10
    good = SplitArrays(features={"x": np.zeros((n, 2))}, labels=np.zeros(n, int), ids=np.arange(n))
    dup = SplitArrays(features={"x": np.zeros((n, 2))}, labels=np.zeros(n, int), ids=np.arange(n))  # same ids
    with pytest.raises(DataError, match="ids are not unique"):
        write_dataset(str(tmp_path / "ds"), name="ds", splits={"train": good, "test": dup},
                      label=LabelSpec("binary", 2), source="t", rows_per_shard=3)
    assert list(tmp_path.iterdir()) == []
    write_dataset(str(tmp_path / "ds"), name="ds", splits={"train": good}, label=LabelSpec("binary", 2), source="t")
    with pytest.raises(DataError, match="already exists"):
        write_dataset(str(tmp_path / "ds"), name="ds", splits={"train": good}, label=LabelSpec("binary", 2), source="t")
    with pytest.raises(DataError, match="not a safe name"):
        write_dataset(str(tmp_path / "x"), name="../evil", splits={"train": good}, label=LabelSpec("binary", 2),
                      source="t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
