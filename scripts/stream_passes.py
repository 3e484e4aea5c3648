"""Time shuffled passes of the training stream over one data set, for A/B runs of two s3dist versions.

    python scripts/stream_passes.py URL LABEL        # run once per version, alternating, e.g. with
                                                     # PYTHONPATH=<worktree of the other commit>

`s3dist bench data` compares the stream with pyarrow in the same run; on a shared machine its per-run ratio
moves more than small stream changes, so this times the stream alone: one warm pass, then 6 timed passes
(batch 256, buffer 1024, prefetch 2, read_threads 2), each batch released as the trainer does."""

import sys
import time

from s3dist.data.stream import ShardStream


def main(url: str, label: str) -> None:
    s = ShardStream(url, "train", batch_size=256, shuffle_buffer=1024, drop_last=False, seed=0, prefetch=2,
                    read_threads=2)

    def one() -> int:
        n = 0
        for b in s:
            n += len(b)
            release = getattr(b, "release", None)  # older versions have none
            if release:
                release()
        return n

    one()
    walls, cpus = [], []
    for _ in range(6):
        c0, t0 = time.process_time(), time.perf_counter()
        one()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    walls.sort()
    cpus.sort()
    print(f"{label}: wall min {walls[0]:.3f} median {walls[3]:.3f} s; CPU min {cpus[0]:.3f} median {cpus[3]:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
