"""A run resumed mid-epoch on another world size neither repeats nor skips a sample: real jobs (a 2-rank run,
resumed by 1 rank; tests/multirank.py `run_main`), audited through `logging.sample_ids`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import launching
from tests.launching import TINY
from tests.multirank import run_main

pytestmark = pytest.mark.slow

# 512 training rows in 13 shards of 40 (the last 32): 2 partitions of 256 rows (every other row), 32 rows
# of each per step on 2 ranks (8 steps per epoch), 16 on 1 rank of the same per-rank batch.
RUN = TINY + ["stages.specialize_steps=10", "stages.select_steps=0", "checkpoint.every_steps=10",
              "dist.ep_size=2", "data.synth.rows_per_shard=40", "logging.sample_ids=true", "eval.run_at_end=false"]


def _samples(run_dir: Path) -> dict[int, list[int]]:
    """step -> the ids every rank took at that step."""
    steps: dict[int, list[int]] = {}
    for f in sorted((run_dir / "samples").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["ids"])
    return steps


def test_two_rank_run_resumed_on_one_rank_sees_every_training_sample_once(tmp_path):
    out = tmp_path / "run"
    p = launching.run_forked(out, RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "No existing process group found" not in p.stdout + p.stderr  # DeepSpeed's print on every rank
    data = out / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    train_ids = sorted(i for f in manifest["splits"]["train"]["files"]
                       for i in pq.read_table(data / f, columns=["id"]).column("id").to_pylist())
    assert len(train_ids) == 512
    first = _samples(out)
    assert sorted(first) == list(range(1, 11)) and all(len(v) == 64 for v in first.values())
    epoch0 = sorted(i for s in range(1, 9) for i in first[s])
    assert epoch0 == train_ids  # the uninterrupted part: every sample once per epoch

    # Step 10 is 2 steps into epoch 1; one process takes the other 6 x 64 rows in 12 steps of 32.
    r = run_main("s3dist.train", ["--output_dir", out, "--resume", "auto", *RUN, "stages.specialize_steps=22",
                                  "dist.ep_size=1"], world=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the world size changed (2 -> 1 ranks): the data stream continues its epoch over 2 partitions" in r.stderr
    steps = _samples(out)
    assert sorted(steps) == list(range(1, 23))
    assert all(len(steps[s]) == 32 for s in range(11, 23))
    epoch1 = [i for s in range(9, 23) for i in steps[s]]
    assert len(epoch1) == len(set(epoch1)) and sorted(epoch1) == train_ids
