"""The S3 router computes all modality segments of a layer at once (one softmax, one top-k, per-segment
sums by index_add over cached token maps). Pinned down here against a plain per-modality computation
written out in the test: routes, gates, per-sample scores, the balance loss, z-loss, load counters and the
gradients reaching the tokens and every modality's router; that the token maps follow the batch layout;
and that a modality more adds only its own projection's ops (the point of computing segments together).
"""

from __future__ import annotations

import pytest
import torch

from s3dist.model.router import PruneSpec, RoutingPlan, S3Router, Segment

D, N, K = 6, 4, 2


def _router(mods, shared=False, z=True, **kw):
    torch.manual_seed(0)
    return S3Router(D, list(mods), N, K, shared_experts=shared, capacity_factor=64.0, eval_capacity_factor=1.0,
                    min_capacity=1, drop_tokens=True, compute_z_loss=z, **kw)


def _segments(mods, batches=(3, 2, 4), steps=(5, 2, 3)):
    return [Segment(m, b, t) for m, b, t in zip(mods, batches, steps)]


def _inputs(segs, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = sum(x.tokens for x in segs)
    return torch.randn(s, D, generator=g), torch.rand(s, generator=g) > 0.25


def _reference(r: S3Router, segs, x, valid):
    """Per modality, written out directly: probabilities over the modality's N experts, its top-k on
    valid tokens, the mean probability per (sample, expert), the Switch balance term, z-loss, entropy."""
    out = {"scores": {}, "demand": torch.zeros(r.num_experts), "aux": 0.0, "z_num": 0.0, "ent": {}, "cnt": {}}
    idx, gates = [], []
    for seg, xs, v in zip(segs, x.split([s.tokens for s in segs]), valid.split([s.tokens for s in segs])):
        logits = xs @ r.proj[r.modalities.index(seg.modality)].t()
        p = logits.softmax(-1)
        top_p, top_i = p.topk(K, dim=-1)
        vf = v.float()
        pv = p * vf[:, None]
        steps = vf.view(seg.batch, seg.steps).sum(1).clamp_min(1)
        out["scores"][seg.modality] = pv.view(seg.batch, seg.steps, N).sum(1) / steps[:, None]
        counts = torch.zeros(N).index_add_(0, top_i[v].flatten(), torch.ones(int(v.sum()) * K))
        off = r.offset(seg.modality)
        out["demand"][off:off + N] += counts
        n_tok = vf.sum().clamp_min(1)
        out["aux"] = out["aux"] + N * ((pv.sum(0) / n_tok) * (counts / (n_tok * K))).sum()
        out["z_num"] = out["z_num"] + (logits.logsumexp(-1).square() * vf).sum()
        out["ent"][seg.modality] = (-(p * p.clamp_min(1e-9).log()).sum(-1) * vf).sum()
        out["cnt"][seg.modality] = vf.sum()
        idx.append(torch.where(v[:, None], top_i + off, -1))
        gates.append(top_p / top_p.sum(-1, keepdim=True) * v[:, None])
    out["z"] = out["z_num"] / valid.sum().clamp_min(1)
    out["idx"], out["gates"] = torch.cat(idx), torch.cat(gates)
    return out


def _forward(r, segs, x, valid, prune=None):
    r.plan = RoutingPlan(segs, prune)
    try:
        return r(x, valid)
    finally:
        r.plan = None


@pytest.mark.parametrize("mods,shared,equal", [(("a", "b"), False, False), (("a", "b", "c"), False, False),
                                               (("a", "b", "c"), True, False), (("a", "b", "c"), False, True)])
def test_router_equals_a_per_modality_computation(mods, shared, equal):
    """`equal`: every modality with the same token count, the layout the router computes as one batched
    GEMM over its stacked projections (otherwise one GEMM per segment)."""
    r = _router(mods, shared=shared)
    segs = _segments(mods, batches=(3, 3, 3), steps=(4, 4, 4)) if equal else _segments(mods)
    assert r._token_index(segs, torch.device("cpu")).stacked == equal
    x, valid = _inputs(segs)
    xr = x.clone().requires_grad_()
    ref = _reference(r, segs, xr, valid)
    ref_loss = ref["aux"] + ref["z"] + sum((s * 0.3).sum() for s in ref["scores"].values()) \
        + (ref["gates"] * torch.arange(ref["gates"].numel()).view_as(ref["gates"])).sum()
    ref_loss.backward()
    ref_grads = [xr.grad, r.proj.grad.clone()]
    r.zero_grad()

    xg = x.clone().requires_grad_()
    l_aux, capacity, n_exp, indices, locs, gates, demand = _forward(r, segs, xg, valid)
    assert torch.equal(indices.t().long(), ref["idx"])
    torch.testing.assert_close(gates.t(), ref["gates"])
    torch.testing.assert_close(demand, ref["demand"])
    torch.testing.assert_close(l_aux, ref["aux"])
    torch.testing.assert_close(r.z_loss, ref["z"])
    for m in mods:
        torch.testing.assert_close(r.sample_scores[m], ref["scores"][m])
    c = r.pop_load_counters()
    e = r.num_experts
    torch.testing.assert_close(c[:e], ref["demand"])
    torch.testing.assert_close(c[2 * e:2 * e + len(mods)], torch.stack([ref["ent"][m] for m in mods]))
    torch.testing.assert_close(c[2 * e + len(mods):], torch.stack([ref["cnt"][m] for m in mods]))
    loss = l_aux + r.z_loss + sum((s * 0.3).sum() for s in r.sample_scores.values()) \
        + (gates.t() * torch.arange(gates.numel()).view_as(gates.t())).sum()
    loss.backward()
    for got, want in zip([xg.grad, r.proj.grad], ref_grads):
        torch.testing.assert_close(got, want)


def test_token_maps_follow_the_layout():
    """Another batch layout (an uneven last batch, evaluation) gets its own token maps: a second layout
    routes like a fresh router, and returning to the first gives the first result again."""
    mods = ("a", "b")
    r = _router(mods)
    first, other = _segments(mods), _segments(mods, batches=(1, 5), steps=(4, 2))
    x1, v1 = _inputs(first)
    x2, v2 = _inputs(other, seed=2)
    a = _forward(r, first, x1, v1)
    b = _forward(r, other, x2, v2)
    again = _forward(r, first, x1, v1)
    fresh = _forward(_router(mods), other, x2, v2)
    for got, want in zip(b[3:], fresh[3:]):
        assert torch.equal(got, want)
    for got, want in zip(again[3:], a[3:]):
        assert torch.equal(got, want)
    assert {m: s.shape[0] for m, s in r.sample_scores.items()} == {"a": 3, "b": 2}


def test_sample_pairs_pruning_on_all_segments_at_once():
    """Stage 3's sample rule: a (sample, expert) pair below its modality's threshold loses every route of
    that sample's tokens to that expert; a modality without a threshold keeps all its routes."""
    mods = ("a", "b")
    r = _router(mods).eval()
    segs = _segments(mods)
    x, valid = _inputs(segs)
    full = _forward(r, segs, x, valid)
    scores = {m: s.clone() for m, s in r.sample_scores.items()}
    thr = float(scores["a"].detach().median())
    pruned = _forward(r, segs, x, valid, PruneSpec("sample_pairs", {"a": thr}))
    sa = segs[0]
    idx_full, idx_pruned = full[3].t().long(), pruned[3].t().long()
    sample = torch.arange(sa.tokens) // sa.steps
    for t in range(sa.tokens):
        for j in range(K):
            e = int(idx_full[t, j])
            keep = e < 0 or bool(scores["a"][sample[t], e] >= thr)
            assert int(idx_pruned[t, j]) == (e if keep else -1)
    assert torch.equal(idx_pruned[sa.tokens:], idx_full[sa.tokens:])  # modality b: no threshold


def test_a_modality_more_adds_only_its_projection_ops():
    """Counted with the profiler as `s3dist bench train` counts: going from 2 to 3 modalities adds the
    third router's projection (a few ops), not another copy of the per-segment statistics."""
    from torch.profiler import profile

    def count(mods):
        r = _router(mods)
        segs = _segments(mods)
        x, valid = _inputs(segs)
        _forward(r, segs, x, valid)  # the token maps are built once per layout
        x.requires_grad_()
        with profile() as prof:
            out = _forward(r, segs, x, valid)
            (out[0] + r.z_loss + out[5].sum()).backward()
        return sum(1 for ev in prof.events() if ev.name.startswith("aten::"))

    two, three = count(("a", "b")), count(("a", "b", "c"))
    assert three - two < 0.1 * two, (two, three)
