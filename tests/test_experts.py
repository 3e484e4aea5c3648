"""Grouped local experts (`s3dist.model.experts.GroupedExperts`): the batched forward computes what
DeepSpeed's per-expert loop computes, keeps DeepSpeed's parameters and expert-parallel flags, and its
gradients go through DeepSpeed's expert-data-parallel reduction (2 real gloo processes, ep=1)."""

from __future__ import annotations

import copy

import pytest
import torch
from deepspeed.moe.experts import Experts

from s3dist.model.experts import CPU_GROUPED_MAX_ROWS_X_HIDDEN, ExpertMLP, GroupedExperts, use_grouped
from tests.multirank import run_ranks


def _experts(e, d, h, compute, seed=0):
    torch.manual_seed(seed)
    mod = GroupedExperts(ExpertMLP(d, h), e, "ep_size_2", compute)
    for i, expert in enumerate(mod.deepspeed_experts):  # distinct experts (DeepSpeed deep-copies one)
        with torch.no_grad():
            for p in expert.parameters():
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(100 * seed + i))
    return mod


@pytest.mark.parametrize("ep,e,c,d,h", [(1, 4, 6, 8, 16), (2, 3, 5, 8, 4), (2, 6, 0, 8, 16), (4, 2, 3, 16, 8)])
def test_grouped_matches_loop(ep, e, c, d, h):
    """Outputs, the input gradient and every expert's parameter gradients agree to 1e-6, including an
    empty capacity (C=0: every expert gets no rows, parameter gradients are zero)."""
    loop = _experts(e, d, h, "loop")
    grouped = copy.deepcopy(loop)
    grouped.compute = "grouped"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ep, e, c, d, generator=g)
    w = torch.randn(ep, e, c, d, generator=g)
    outs, grads = [], []
    for mod in (loop, grouped):
        xi = x.clone().requires_grad_()
        out = mod(xi)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads.append({"input": xi.grad, **{n: p.grad for n, p in mod.named_parameters()}})
    assert outs[1].shape == (ep, e, c, d)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    assert set(grads[1]) == set(grads[0]) and len(grads[0]) == 1 + 4 * e
    for name, ref in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], ref, atol=1e-6, rtol=1e-6, msg=lambda s: f"{name}: {s}")


def test_grouped_dispatches_a_fixed_number_of_ops():
    """The point of grouping: forward+backward dispatches a few ops per expert (handing each expert
    its gradient slices), the loop a whole MLP's worth (counted by the profiler, as `s3dist bench train`
    counts)."""
    from torch.profiler import profile

    def count(e, compute):
        mod = _experts(e, 8, 4, compute)
        x = torch.randn(2, e, 3, 8, requires_grad=True)
        with profile() as prof:
            mod(x).sum().backward()
        return sum(1 for ev in prof.events() if ev.name.startswith("aten::"))

    g4, g16, l4, l16 = count(4, "grouped"), count(16, "grouped"), count(4, "loop"), count(16, "loop")
    assert (g16 - g4) * 4 < l16 - l4
    assert g16 * 3 < l16


def test_grouped_keeps_deepspeed_parameters_and_flags():
    """Same parameter names as DeepSpeed's `Experts` (the per-expert checkpoint files key on them) and
    DeepSpeed's expert-parallel flags on every parameter."""
    mod = _experts(3, 8, 4, "grouped")
    plain = Experts(ExpertMLP(8, 4), 3, "ep_size_2")
    assert list(mod.state_dict()) == list(plain.state_dict())
    for p in mod.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_2"


def test_auto_choice():
    """'auto' uses the loop for one expert and, on CPU, for large per-expert GEMMs; grouped otherwise
    (and always on CUDA); 'loop' / 'grouped' are taken as given."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = CPU_GROUPED_MAX_ROWS_X_HIDDEN // 64, 4 * CPU_GROUPED_MAX_ROWS_X_HIDDEN // 64
    assert use_grouped("auto", 8, small, 64, cpu)
    assert not use_grouped("auto", 8, large, 64, cpu)
    assert use_grouped("auto", 8, large, 64, cuda)
    assert not use_grouped("auto", 1, small, 64, cuda)
    assert use_grouped("grouped", 1, large, 64, cpu) and not use_grouped("loop", 8, small, 64, cuda)


# ---------------------------------------------------------------------------------------------
# Expert-data-parallel gradient reduction through DeepSpeed's engine
# ---------------------------------------------------------------------------------------------

MODS = {"text": 5, "audio": 3}
B, T = 8, 6


def _grads(rank, world, out_dir):
    """The S3 encoder at ep=1 with grouped experts, on this rank's slice of one batch: expert gradients
    of a plain backward ('local') and, on 2 ranks, after DeepSpeed's `engine.backward` ('reduced': the
    engine all-reduces expert gradients over the expert-data-parallel group)."""
    from s3dist.config import RunConfig
    from s3dist.dist import attach_expert_groups, build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model, cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 16, 4, 2, 8
    cfg.moe.drop_tokens, cfg.moe.capacity_factor, cfg.moe.expert_compute = False, 8.0, "grouped"
    cfg.dist.zero_stage = 0  # gradients stay whole in .grad after backward
    dims = make_dims(*init_distributed(cfg.dist), 1)
    g = torch.Generator().manual_seed(7)
    feats = {m: torch.randn(B, T, d, generator=g) for m, d in MODS.items()}
    w = {m: torch.randn(16, generator=g) for m in MODS}
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    out = {}
    for kind in ("local", "reduced") if world > 1 else ("local",):
        torch.manual_seed(0)
        model = S3Encoder(MODS, cfg.model, cfg.moe, ep_size=1, ep_rank=0)
        if kind == "reduced":
            fwd = build_engine(model, list(model.parameters()), lr=1e-3, total_steps=10, optim=cfg.optim,
                               dist_cfg=cfg.dist, micro_batch=per)
        else:
            attach_expert_groups(model, dims)
            fwd = model
        emb = fwd({m: f[sl] for m, f in feats.items()}, {m: torch.ones(per, T, dtype=torch.bool) for m in MODS})
        # the mean over ranks of this loss is the full-batch loss; DeepSpeed averages gradients over ranks
        loss = world * sum((emb.embeddings[m] @ w[m]).sum() for m in MODS) / B
        fwd.backward(loss) if kind == "reduced" else loss.backward()
        out[kind] = {n: p.grad.clone() for n, p in model.named_parameters() if not getattr(p, "allreduce", True)}
    return out


@pytest.mark.slow
def test_expert_data_parallel_reduction_with_grouped_experts(tmp_path):
    """ep=1 on 2 ranks: every rank holds every expert; after DeepSpeed's backward each rank's expert
    gradients are the full-batch gradients (one rank, whole batch), though each rank's own half gave
    different ones: the grouped experts' gradients reach DeepSpeed's expert-data-parallel all-reduce."""
    ref = run_ranks(_grads, 1, tmp_path / "ref")[0]["local"]
    res = run_ranks(_grads, 2, tmp_path / "dp")
    assert ref and len(ref) % 4 == 0  # fc1/fc2 weight and bias per expert
    for r in res:
        assert set(r["reduced"]) == set(ref)
        for k, g in ref.items():
            torch.testing.assert_close(r["reduced"][k], g, atol=1e-5, rtol=1e-5, msg=lambda s: f"{k}: {s}")
    assert any(not torch.allclose(res[0]["local"][k], ref[k], atol=1e-4) for k in ref)
