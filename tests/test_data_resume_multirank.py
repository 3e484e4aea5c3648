"""Exactly-once resume and equal batch counts on 2 real processes joined by a gloo process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from s3dist.config import SynthConfig
from s3dist.data.stream import ShardStream
from s3dist.data.synth import generate
from tests.multirank import run_ranks

KW = {"batch_size": 16, "shuffle_buffer": 40, "seed": 4}


def _consume(stream, n=None):
    """Ids of the next batches; every batch is matched by an all_reduce so unequal counts would hang
    or fail (the group's timeout bounds it)."""
    out = []
    it = iter(stream)
    while n is None or len(out) < n:
        try:
            b = next(it)
        except StopIteration:
            break
        count = torch.tensor([len(b)])
        dist.all_reduce(count)
        out.append(b.ids.tolist())
    return out


def _rank(rank, world, out_dir, url):
    import datetime
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        ref = ShardStream(url, "train", rank=rank, world_size=world, **KW)
        uninterrupted = [_consume(ref), _consume(ref)]
        first = ShardStream(url, "train", rank=rank, world_size=world, **KW)
        before = _consume(first, 5)
        torch.save(first.state_dict(), out_dir / f"state{rank}.pt")
        del first  # the "crash"
        resumed = ShardStream(url, "train", rank=rank, world_size=world, **KW)
        resumed.load_state_dict(torch.load(out_dir / f"state{rank}.pt", weights_only=True))
        after = [_consume(resumed), _consume(resumed)]
        evals = _consume(ShardStream(url, "val", rank=rank, world_size=world, batch_size=16, drop_last=False))
        return {"uninterrupted": uninterrupted, "before": before, "after": after, "eval": evals,
                "bpe": ref.batches_per_epoch}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_resume_exactly_once(tmp_path):
    """2 ranks, interrupted after 5 batches and resumed from saved state in fresh streams: each rank's
    sequence of sample ids equals the uninterrupted run's over two epochs (nothing repeated, nothing
    skipped), ranks are disjoint within an epoch, epochs are reshuffled, and evaluation covers every
    validation row exactly once with equal batch counts on both ranks."""
    url = str(tmp_path / "ds")
    generate(url, SynthConfig(num_train=230, num_val=45, num_test=8, seq_len=4, modality_dims=[3, 2],
                              rows_per_shard=60))  # 4 train shards (60,60,60,50): whole shards per rank
    res = run_ranks(_rank, 2, tmp_path / "out", url)
    for r in res:
        assert len(r["before"]) == 5
        assert r["before"] + r["after"][0] == r["uninterrupted"][0]
        assert r["after"][1] == r["uninterrupted"][1]
        assert len(r["uninterrupted"][0]) == len(r["uninterrupted"][1]) == r["bpe"]
    for epoch in range(2):
        ids = [i for r in res for b in r["uninterrupted"][epoch] for i in b]
        assert len(ids) == len(set(ids)) == res[0]["bpe"] * 2 * 16
    assert res[0]["uninterrupted"][0] != res[0]["uninterrupted"][1]
    assert len(res[0]["eval"]) == len(res[1]["eval"])
    val_ids = sorted(i for r in res for b in r["eval"] for i in b)
    assert val_ids == list(range(230, 275))
