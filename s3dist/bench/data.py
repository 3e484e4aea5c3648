"""`s3dist bench data`: samples/s of the training stream (ShardStream -> ready torch batches) against
plain pyarrow `iter_batches` -> torch tensors, over the same shards in the same run.

Both sides read every row of the split once per pass and hand out torch tensors of every modality
and mask (zero-copy from the decoded Arrow buffers on both sides); pyarrow reads the shards in order with no shuffling, no checks and no per-rank
split, so it is the floor of what any Parquet reader costs. The stream is timed per epoch after it
opened (its one-time checksum verification is reported separately). Passes alternate between the
readers so that page-cache and frequency effects hit both alike; the best pass of each is reported,
in wall-clock samples/s and in samples per CPU-second of this process (all its threads): on a shared
machine the second is the one other people's jobs do not move.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time

import numpy as np

from s3dist.bench.common import at_least, print_table, record, timer

MOSI_SHAPES = {"text": (50, 300), "audio": (50, 74), "vision": (50, 35)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default="", help="URL of a data set; default: MOSI-shaped rows in a temp dir")
    p.add_argument("--split", default="train")
    p.add_argument("--rows", type=at_least(1), default=8192, help="rows of the generated data set (no --path)")
    p.add_argument("--batch-size", type=at_least(1), default=256)
    p.add_argument("--shuffle-buffer", type=at_least(0), default=1024, help="the stream's shuffle buffer (0: off)")
    p.add_argument("--prefetch", type=at_least(0), default=2, help="the stream's read-ahead in batches (data.prefetch)")
    p.add_argument("--read-threads", type=at_least(1), default=2,
                   help="the stream's parallel shard readers (data.read_threads)")
    p.add_argument("--repeats", type=at_least(1), default=3, help="timed passes per reader")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="also time the epoch-start stall of a training stream (drop_last) whose consumer "
                        "spends this long per batch (a GPU step: the CPU is free meanwhile), with and "
                        "without reading the next epoch ahead; 0: skip")
    p.add_argument("--epochs", type=at_least(1), default=5, help="epochs for --step-ms")


def make_mosi_like(url: str, rows: int, rows_per_shard: int = 1024, seed: int = 0) -> None:
    """A MOSI-shaped data set (text 50x300, audio 50x74, vision 50x35, front padding) at `url`."""
    from s3dist.data.manifest import LabelSpec
    from s3dist.data.writer import SplitArrays, write_dataset
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 40, size=rows)
    mask = np.arange(50)[None, :] >= start[:, None]
    feats = {}
    for m, (t, d) in MOSI_SHAPES.items():
        x = rng.standard_normal((rows, t, d), dtype=np.float32)
        x[~mask] = 0.0
        feats[m] = x
    split = SplitArrays(features=feats, labels=rng.integers(0, 2, size=rows), masks={m: mask for m in feats})
    write_dataset(url, name="mosi_like", splits={"train": split},
                  label=LabelSpec("binary", 2, "random"), source="bench data: random MOSI-shaped rows",
                  rows_per_shard=rows_per_shard)


def pyarrow_pass(url: str, split: str, batch_size: int, threads: int = 1) -> int:
    """Plain pyarrow: iter_batches over the split's shards -> torch tensors. Returns rows read.
    `threads` > 1 reads that many shards at once (a thread pool over the files), the same parallelism
    the stream's `read_threads` gives it; 1 is the plain baseline."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    from s3dist.data.manifest import dataset_fs, read_manifest
    from s3dist.data.stream import (
        _tensor,  # the same zero-copy conversion the stream uses
    )
    m = read_manifest(url)
    fs, root = dataset_fs(url)

    def read(fname: str) -> int:
        rows = 0
        with fs.open(f"{root}/{fname}", "rb") as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                n = rb.num_rows
                _tensor(rb.column("id").to_numpy())
                _tensor(rb.column("label").to_numpy())
                for name, spec in m.modalities.items():
                    flat = rb.column(name).flatten().to_numpy(zero_copy_only=False)
                    _tensor(flat.reshape(n, spec.steps, spec.width))
                    if spec.sequence:
                        _tensor(rb.column(f"{name}__mask").flatten().to_numpy(zero_copy_only=False).reshape(n, spec.steps))
                rows += n
        return rows

    files = m.splits[split].files
    if threads <= 1:
        return sum(map(read, files))
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(read, files))


def stream_pass(stream) -> int:
    """Rows of one epoch, each batch handed back once counted (as the trainer does after its step)."""
    rows = 0
    for b in stream:
        rows += len(b)
        b.release()
    return rows


def epoch_start_waits(stream, epochs: int, step_s: float) -> tuple[list[float], list[float]]:
    """Seconds the consumer waited for the first batch of each epoch after the first, and for every
    other batch, when it spends `step_s` per batch outside the stream (sleeping: the CPU is free, as
    during a GPU step)."""
    first, rest = [], []
    for epoch in range(epochs):
        it = iter(stream)
        for i in itertools.count():
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            batch.release()
            if epoch > 0:  # the first epoch's start is the stream's cold start, the same either way
                (first if i == 0 else rest).append(time.perf_counter() - t0)
            time.sleep(step_s)
    stream.close()
    return first, rest


def run(args: argparse.Namespace) -> int:
    from s3dist.data.stream import ShardStream

    tmp = None
    url = args.path
    if not url:
        tmp = tempfile.TemporaryDirectory(prefix="s3dist-bench-data-")
        url = f"{tmp.name}/mosi_like"
        with timer() as t:
            make_mosi_like(url, args.rows)
        print(f"built {args.rows} MOSI-shaped rows at {url} in {t():.1f}s")
    try:
        with timer() as t_open:
            stream = ShardStream(url, args.split, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                                 drop_last=False, seed=0, prefetch=args.prefetch, read_threads=args.read_threads)
        plain = ShardStream(url, args.split, batch_size=args.batch_size, shuffle_buffer=0, drop_last=False,
                            prefetch=args.prefetch, read_threads=args.read_threads)
        stream_pass(stream), pyarrow_pass(url, args.split, args.batch_size)  # warm the page cache and imports
        readers = [("stream", lambda: stream_pass(stream)), ("stream_noshuffle", lambda: stream_pass(plain)),
                   ("pyarrow", lambda: pyarrow_pass(url, args.split, args.batch_size))]
        n_readers = stream._readers(len(stream._spec.files))
        if n_readers > 1:  # the baseline with the parallelism the stream used, to show what it buys each
            readers.append(("pyarrow_parallel", lambda: pyarrow_pass(url, args.split, args.batch_size, n_readers)))
        times: dict[str, list[float]] = {key: [] for key, _ in readers}
        cpu: dict[str, list[float]] = {k: [] for k in times}
        rows = {}
        for _ in range(args.repeats):
            for key, fn in readers:
                c0 = time.process_time()
                with timer() as t:
                    rows[key] = fn()
                times[key].append(t())
                cpu[key].append(time.process_time() - c0)
        if len(set(rows.values())) != 1:
            raise RuntimeError(f"readers saw different row counts {rows}")
        n = rows["pyarrow"]
        rate = {k: n / min(v) for k, v in times.items()}
        cpu_rate = {k: n / min(v) for k, v in cpu.items()}
        figures = {"rows": n, "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer,
                   "prefetch": args.prefetch, "read_threads": args.read_threads, "readers_used": n_readers,
                   "stream_open_s": t_open(), "samples_per_s": rate, "samples_per_cpu_s": cpu_rate,
                   "ratio_stream_vs_pyarrow": rate["stream"] / rate["pyarrow"],
                   "ratio_stream_noshuffle_vs_pyarrow": rate["stream_noshuffle"] / rate["pyarrow"],
                   "cpu_ratio_stream_vs_pyarrow": cpu_rate["stream"] / cpu_rate["pyarrow"],
                   "cpu_ratio_stream_noshuffle_vs_pyarrow": cpu_rate["stream_noshuffle"] / cpu_rate["pyarrow"],
                   "pass_seconds": times, "pass_cpu_seconds": cpu, "path": args.path or "(generated MOSI-shaped)"}
        labels = {"stream": f"ShardStream (shuffle buffer {args.shuffle_buffer})",
                  "stream_noshuffle": "ShardStream (no shuffle)", "pyarrow": "pyarrow iter_batches -> torch",
                  "pyarrow_parallel": f"pyarrow, {n_readers} shards at once"}
        if n_readers > 1:
            figures["ratio_stream_vs_pyarrow_parallel"] = rate["stream"] / rate["pyarrow_parallel"]
        print_table([{"reader": labels[key], "samples/s": rate[key], "vs pyarrow": rate[key] / rate["pyarrow"],
                      "samples/cpu-s": cpu_rate[key], "cpu vs pyarrow": cpu_rate[key] / cpu_rate["pyarrow"]}
                     for key in times])
        print(f"stream open (checksums + footers + labels): {t_open():.2f}s; rows per pass {n}; the stream "
              f"decoded with {n_readers} reader thread{'s' if n_readers > 1 else ''}")
        if args.step_ms > 0:
            import statistics

            stall = {}
            for ahead in (True, False):
                s = ShardStream(url, args.split, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                                drop_last=True, seed=0, prefetch=args.prefetch, prefetch_next_epoch=ahead,
                                read_threads=args.read_threads)
                first, rest = epoch_start_waits(s, args.epochs, args.step_ms / 1e3)
                stall["read_ahead" if ahead else "no_read_ahead"] = {
                    "epoch_start_wait_ms_median": 1e3 * statistics.median(first),
                    "other_batch_wait_ms_median": 1e3 * statistics.median(rest),
                    "epoch_start_wait_ms": [1e3 * x for x in first], "batches_per_epoch": s.batches_per_epoch}
            figures["epoch_start"] = {"step_ms": args.step_ms, **stall}
            print_table([{"training stream": k.replace("_", " "), "batches/epoch": v["batches_per_epoch"],
                          "epoch-start wait ms": v["epoch_start_wait_ms_median"],
                          "other batches ms": v["other_batch_wait_ms_median"]} for k, v in stall.items()])
        command = ["bench", "data", *(["--path", args.path] if args.path else ["--rows", str(args.rows)]),
                   "--split", args.split, "--batch-size", str(args.batch_size), "--shuffle-buffer",
                   str(args.shuffle_buffer), "--prefetch", str(args.prefetch), "--read-threads",
                   str(args.read_threads), "--repeats", str(args.repeats),
                   *(["--step-ms", str(args.step_ms), "--epochs", str(args.epochs)] if args.step_ms > 0 else [])]
        record("data", figures, command=command, out=args.json or None)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()
