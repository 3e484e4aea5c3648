"""Grouped local experts (`s3dist.model.experts.GroupedExperts`): stacked parameters whose batched and
loop forwards compute what DeepSpeed's own `Experts` computes, with DeepSpeed's per-expert state dict and
expert-parallel flags, and whose gradients go through DeepSpeed's expert-data-parallel reduction (2 real
gloo processes, ep=1)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.moe.experts import Experts

from s3dist.model.experts import (CPU_GROUPED_MAX_ROWS_X_HIDDEN, PER_EXPERT_NAMES, ExpertMLP, GroupedExperts,
                                  use_grouped)
from tests.multirank import run_ranks


def _experts(e, d, h, compute, seed=0):
    mod = GroupedExperts(d, h, e, "ep_size_2", compute)
    with torch.no_grad():  # distinct experts, every slice its own draw
        for p in mod.parameters():
            for i in range(e):
                p[i].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(100 * seed + 10 * i + p.ndim))
    return mod


def _deepspeed_twin(mod: GroupedExperts) -> Experts:
    """DeepSpeed's own `Experts` (a loop of `ExpertMLP`s) holding the same weights, via the state dict."""
    plain = Experts(ExpertMLP(mod.w1.shape[2], mod.hidden), mod.num_local_experts, "ep_size_2")
    plain.load_state_dict(mod.state_dict())
    return plain


@pytest.mark.parametrize("compute", ["loop", "grouped"])
@pytest.mark.parametrize("ep,e,c,d,h", [(1, 4, 6, 8, 16), (2, 3, 5, 8, 4), (2, 6, 0, 8, 16), (4, 2, 3, 16, 8)])
def test_matches_deepspeed_experts(compute, ep, e, c, d, h):
    """Both paths over the stacked parameters agree with DeepSpeed's per-expert loop to 1e-6: outputs,
    the input gradient and every expert's parameter gradients (each expert's slice of the stacked
    gradient), including an empty capacity (C=0: no rows, parameter gradients zero)."""
    mod = _experts(e, d, h, compute)
    ref = _deepspeed_twin(mod)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ep, e, c, d, generator=g)
    w = torch.randn(ep, e, c, d, generator=g)
    outs, inputs = [], []
    for m in (ref, mod):
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out * w).sum().backward()
        outs.append(out.detach())
        inputs.append(xi.grad)
    assert outs[1].shape == (ep, e, c, d)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inputs[1], inputs[0], atol=1e-6, rtol=1e-6)
    for i, expert in enumerate(ref.deepspeed_experts):
        for name, key in PER_EXPERT_NAMES.items():
            torch.testing.assert_close(getattr(mod, name).grad[i], expert.get_parameter(key).grad, atol=1e-6,
                                       rtol=1e-6, msg=lambda s: f"expert {i} {key}: {s}")


def test_grouped_dispatches_a_fixed_number_of_ops():
    """The point of grouping: forward+backward dispatches a fixed number of ops whatever the expert
    count, the loop a whole MLP's worth per expert (counted by the profiler, as `s3dist bench train`
    counts)."""
    from torch.profiler import profile

    def count(e, compute):
        mod = _experts(e, 8, 4, compute)
        x = torch.randn(2, e, 3, 8, requires_grad=True)
        with profile() as prof:
            mod(x).sum().backward()
        return sum(1 for ev in prof.events() if ev.name.startswith("aten::"))

    g4, g16, l4, l16 = count(4, "grouped"), count(16, "grouped"), count(4, "loop"), count(16, "loop")
    assert g16 == g4
    assert g16 * 3 < l16 and l16 - l4 > 12 * 10


def test_state_dict_is_deepspeeds_per_expert_one():
    """The state dict has DeepSpeed's per-expert names in DeepSpeed's order (its checkpoint files key on
    them) and round-trips through DeepSpeed's `Experts`; the stacked parameters carry DeepSpeed's
    expert-parallel flags."""
    mod = _experts(3, 8, 4, "grouped")
    plain = _deepspeed_twin(mod)
    assert list(mod.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(mod.state_dict()[k], v), k
    back = GroupedExperts(8, 4, 3, "ep_size_2")
    back.load_state_dict(plain.state_dict())
    for name in PER_EXPERT_NAMES:
        assert torch.equal(getattr(back, name), getattr(mod, name)), name
    assert [n for n, _ in mod.named_parameters()] == ["w1", "b1", "w2", "b2"]
    for p in mod.parameters():
        assert p.allreduce is False and p.group_name == "ep_size_2"
    saved = mod.state_dict()["deepspeed_experts.1.fc1.weight"]
    assert saved.untyped_storage().nbytes() == saved.numel() * saved.element_size()  # its own copy, not the stack


def test_state_dict_of_another_expert_count_is_refused_by_name():
    """Loading a state dict with fewer experts names the missing entries; one with more reports the
    extra ones as unexpected."""
    small = _experts(2, 8, 4, "grouped").state_dict()
    with pytest.raises(RuntimeError, match=r"1 of the 3 entries stacked into 'w1' are missing: deepspeed_experts\.2\.fc1\.weight "
                       r"\(was it written with another number of experts"):
        GroupedExperts(8, 4, 3, "g").load_state_dict(small)
    with pytest.raises(RuntimeError, match=r"Unexpected key.*deepspeed_experts\.2\.fc1\.weight"):
        GroupedExperts(8, 4, 2, "g").load_state_dict(_experts(3, 8, 4, "grouped").state_dict())


def test_stacked_biases_are_not_weight_decayed():
    """Weight decay is decided per expert's shape: the stacked biases ([E, hidden], 2-D) do not decay,
    the stacked weights do, as with one nn.Linear pair per expert."""
    from s3dist.dist import optimizer_param_groups

    mod = _experts(3, 8, 4, "grouped")
    groups = optimizer_param_groups(list(mod.parameters()), weight_decay=0.1)
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(mod.w1), id(mod.w2)}
    assert sum(len(g["params"]) for g in groups) == 4


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
    assert ref and len(ref) % 4 == 0  # stacked fc1/fc2 weight and bias per layer
    for r in res:
        assert set(r["reduced"]) == set(ref)
        for k, g in ref.items():
            torch.testing.assert_close(r["reduced"][k], g, atol=1e-5, rtol=1e-5, msg=lambda s: f"{k}: {s}")
    assert any(not torch.allclose(res[0]["local"][k], ref[k], atol=1e-4) for k in ref)
