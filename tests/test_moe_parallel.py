"""Expert-parallel correctness of the S3 encoder on DeepSpeed MoE, with 2 real gloo processes.

The reference is always the same model run as ep_size=1 on one rank over the whole batch; the
2-rank runs split the batch in halves. Capacity is set high (no drops) so routing decisions are the
same however the batch is split: then outputs, the global balance loss and every gradient must match.
"""

from __future__ import annotations

import pytest
import torch

from s3dist.model.experts import PER_EXPERT_NAMES, GroupedExperts
from tests.multirank import run_ranks

MODS = {"text": 5, "audio": 3}
B, T = 8, 6


def _cfg(kind="s3", drop_tokens=False):
    from s3dist.config import RunConfig

    cfg = RunConfig()
    cfg.model.d_model = 16
    cfg.moe.kind = kind
    cfg.moe.num_experts = 4
    cfg.moe.top_k = 2
    cfg.moe.expert_hidden = 8
    cfg.moe.drop_tokens = drop_tokens
    cfg.moe.capacity_factor = 8.0
    return cfg


def _batch():
    g = torch.Generator().manual_seed(7)
    feats = {m: torch.randn(B, T, d, generator=g) for m, d in MODS.items()}
    masks = {m: torch.ones(B, T, dtype=torch.bool) for m in MODS}
    masks["text"][1, :2] = False  # front padding, as MultiBench pads
    masks["audio"][6, :4] = False
    w = {m: torch.randn(16, generator=g) for m in MODS}
    return feats, masks, w


def _build(rank, world, ep, kind="s3", drop_tokens=False):
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = _cfg(kind, drop_tokens)
    dims = make_dims(*init_distributed(cfg.dist), ep)
    torch.manual_seed(0)  # dense params identical on every rank and for every ep size
    model = S3Encoder(MODS, cfg.model, cfg.moe, ep_size=ep, ep_rank=dims.ep_rank)
    attach_expert_groups(model, dims)
    return model, dims


def _fwd_bwd(rank, world, out_dir, ep):
    """Each rank takes its slice of the batch; returns outputs, aux loss and grads by global name."""
    import torch.distributed as dist

    model, dims = _build(rank, world, ep)
    feats, masks, w = _batch()
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    out = model({m: f[sl] for m, f in feats.items()}, {m: k[sl] for m, k in masks.items()})
    # Objective whose mean over ranks is the full-batch objective (DeepSpeed averages gradients).
    loss = world * sum((out.embeddings[m] @ w[m]).sum() for m in MODS) / B + out.aux_loss
    loss.backward()
    aux = out.aux_loss.detach().clone()
    dist.all_reduce(aux)
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "allreduce", True):  # dense param: average over data-parallel ranks
            dist.all_reduce(g)
            g /= world
        else:                               # expert: DeepSpeed divides by the whole dp world too
            g /= world
        grads.update(_per_expert(name, g, dims, model))
    return {"emb": {m: out.embeddings[m].detach() for m in MODS}, "aux": aux / world, "grads": grads}


def _per_expert(name, g, dims, model):
    """A parameter's gradient under the names DeepSpeed's checkpoint uses: a stacked expert parameter
    (`GroupedExperts`) split into 'deepspeed_experts.{global index}.fc1.weight' etc., so ep sizes compare."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(module, GroupedExperts):
        return {name: g}
    first = dims.ep_rank * module.num_local_experts
    return {f"{module_name}.deepspeed_experts.{first + i}.{PER_EXPERT_NAMES[attr]}": g[i]
            for i in range(module.num_local_experts)}


@pytest.mark.slow
@pytest.mark.parametrize("world,ep", [(2, 2), (2, 1)])
def test_parallel_matches_single_rank(tmp_path, world, ep):
    """ep=2 (experts split across ranks) and dp=2/ep=1 both equal ep=1 on one rank: outputs, aux, grads."""
    ref = run_ranks(_fwd_bwd, 1, tmp_path / "ref", 1)[0]
    res = run_ranks(_fwd_bwd, world, tmp_path / "par", ep)
    per = B // world
    for m in MODS:
        got = torch.cat([r["emb"][m] for r in res])
        torch.testing.assert_close(got, ref["emb"][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res[0]["aux"], ref["aux"], atol=1e-5, rtol=1e-5)
    merged = {}
    for r in res:
        for k, g in r["grads"].items():
            if k in merged and "deepspeed_experts" not in k:
                torch.testing.assert_close(g, merged[k])  # dense grads identical after all-reduce
            # an expert replicated over the expert-dp group: its grads are reduced across the group
            merged[k] = merged[k] + g if (k in merged and "deepspeed_experts" in k) else g
    assert set(merged) == set(ref["grads"])
    for k, g in ref["grads"].items():
        torch.testing.assert_close(merged[k], g, atol=1e-5, rtol=1e-5, msg=lambda s: f"{k}: {s}")
    assert per * world == B


def _ownership(rank, world, out_dir, ep):
    model, dims = _build(rank, world, ep)
    experts = model.layers[0].moes[0].deepspeed_moe.experts
    n_expert = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))  # every layer's
    n_total = sum(p.numel() for p in model.parameters())
    first = experts.w1[0].detach().clone()
    return {"local": experts.num_local_experts, "expert_params": n_expert, "total": n_total, "first": first}


@pytest.mark.slow
def test_each_rank_builds_only_its_experts(tmp_path):
    """With ep=2 each rank holds N_total/2 experts, and its parameters are shared + its own experts."""
    ref = run_ranks(_ownership, 1, tmp_path / "ref", 1)[0]
    res = run_ranks(_ownership, 2, tmp_path / "par", 2)
    n_total_experts = ref["local"]
    assert all(r["local"] == n_total_experts // 2 for r in res)
    shared = ref["total"] - ref["expert_params"]
    for r in res:
        assert r["total"] == shared + ref["expert_params"] // 2
    assert not torch.equal(res[0]["first"], res[1]["first"])  # rank 1 built experts 4.., not copies of 0..


def _uneven(rank, world, out_dir):
    model, dims = _build(rank, world, 2, drop_tokens=True)
    feats, masks, _ = _batch()
    sizes = [5, 0]  # rank 1 holds an empty batch
    n = sizes[rank]
    out = model({m: f[:n] for m, f in feats.items()}, {m: k[:n] for m, k in masks.items()})
    loss = sum(e.sum() for e in out.embeddings.values()) + out.aux_loss
    loss.backward()
    return {m: out.embeddings[m].shape[0] for m in MODS} | {"finite": bool(torch.isfinite(loss))}


@pytest.mark.slow
def test_uneven_and_empty_batches_do_not_hang(tmp_path):
    """5 samples on rank 0 and none on rank 1, with token dropping on: forward+backward complete."""
    res = run_ranks(_uneven, 2, tmp_path)
    assert res[0]["text"] == 5 and res[1]["text"] == 0
    assert res[0]["finite"] and res[1]["finite"]


def _count_blocking_reduces(rank, world, out_dir, drop_tokens):
    """all_reduce calls during one forward of a 2-layer encoder, in training and in evaluation."""
    import torch.distributed as dist

    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = _cfg("s3", drop_tokens)
    cfg.model.num_layers = 2
    dims = make_dims(*init_distributed(cfg.dist), 2)
    torch.manual_seed(0)
    model = S3Encoder(MODS, cfg.model, cfg.moe, ep_size=2, ep_rank=dims.ep_rank)
    attach_expert_groups(model, dims)
    feats, masks, _ = _batch()
    calls = []
    real = dist.all_reduce

    def counting(tensor, *a, **kw):
        calls.append(kw.get("group") is not None)
        return real(tensor, *a, **kw)

    dist.all_reduce = counting
    try:
        counts = {}
        for mode in ("train", "eval"):
            model.train(mode == "train")
            calls.clear()
            with torch.set_grad_enabled(mode == "train"):
                model(feats, masks)
            counts[mode] = len(calls)
    finally:
        dist.all_reduce = real
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_router_agrees_in_one_collective_per_layer(tmp_path, drop_tokens):
    """With experts sharded (ep=2), a training forward costs one blocking all-reduce per MoE layer
    (capacity MAX over the EP group and the global balance statistics travel together; the 2-rank
    equivalence tests above pin that the values are the same), evaluation one (capacity only)."""
    res = run_ranks(_count_blocking_reduces, 2, tmp_path, drop_tokens)
    assert res[0] == res[1] == {"train": 2, "eval": 2}


def _stalled_peer(rank, world, out_dir):
    """Rank 1 stalls (alive, not dead) for 8 s before joining an all-reduce on the expert-parallel group that
    rank 0 entered at once: returns how long the rank waited and whether its collective failed."""
    import time

    import torch.distributed as dist
    from deepspeed.utils import groups

    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = _cfg()
    cfg.dist.timeout_s = 2
    r, lr, w, device, backend = init_distributed(cfg.dist)
    model = S3Encoder(MODS, cfg.model, cfg.moe, ep_size=world, ep_rank=rank)
    attach_expert_groups(model, make_dims(r, lr, w, device, backend, world))
    group = groups._get_expert_parallel_group(f"ep_size_{world}")
    if rank == 1:
        time.sleep(8)
    start, failed = time.monotonic(), False
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:
        failed = True
    waited = time.monotonic() - start
    # meet again only once rank 1 is past its own attempt: the closing barrier has the same 2 s timeout
    done = out_dir / "rank1.done"
    if rank == 1:
        done.touch()
    while not done.exists():
        time.sleep(0.05)
    return waited, failed


@pytest.mark.slow
def test_expert_parallel_groups_time_out_after_dist_timeout_s(tmp_path):
    """DeepSpeed creates the expert groups with new_group(ranks), which torch gives its own 30-minute default;
    a stalled peer must make the waiting rank fail after dist.timeout_s (2 s here), not when the peer returns."""
    (waited0, failed0), _ = run_ranks(_stalled_peer, 2, tmp_path)
    assert failed0 and waited0 < 6, (waited0, failed0)
