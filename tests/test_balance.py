"""Routing options (#20): `moe.balance = aux_loss | bias | none`.

`bias` is DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias added to the routing probabilities
for the top-k selection only, moved by gamma * sign(mean load - load) after each training forward from the
*global* load. Pinned down here: the update rule on hand-made loads (sign, per modality block), global not
local (2 gloo ranks with different local loads hold the bias 1 rank computes on the concatenated batch, with
and without an expert-parallel group), selection changes but gate values do not, evaluation and Stage 2 do
not move it, the aux loss is not applied, state-dict compatibility, config validation, and (slow) a real
2-process run whose checkpoint carries the bias and whose resume reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.multirank import run_ranks

GAMMA = 0.01


def _router(balance="bias", n=4, k=1, mods=("a", "b"), d=4, **kw):
    from s3dist.model.router import S3Router

    r = S3Router(d, list(mods), n, k, shared_experts=kw.pop("shared", False), capacity_factor=8.0,
                 eval_capacity_factor=1.0, min_capacity=1, drop_tokens=kw.pop("drop_tokens", True),
                 balance=balance, bias_update_rate=GAMMA, **kw)
    with torch.no_grad():  # router m's logits are 10 * x: a one-hot token goes to the expert it names
        r.proj.copy_(10 * torch.eye(n, d).expand_as(r.proj))
    return r


def _tokens(experts: list[int], d: int = 4) -> torch.Tensor:
    """One token per entry, routed (top-1) to that expert by `_router`'s identity router."""
    return torch.eye(d)[experts] if experts else torch.zeros(0, d)


def _route(r, segments: dict[str, list[int]]):
    """One forward of `r` over {modality: [expert each token goes to]} (batch = tokens, 1 step each)."""
    from s3dist.model.router import RoutingPlan, Segment

    segs = [Segment(m, len(e), 1) for m, e in segments.items()]
    r.plan = RoutingPlan(segs)
    try:
        return r(torch.cat([_tokens(e) for e in segments.values()]))
    finally:
        r.plan = None


def test_update_rule_sign_per_modality_block():
    """Modality a's load [3, 1, 0, 0] (mean 1) moves its block by gamma * [-1, 0, +1, +1]; b's [2, 2, 2, 2]
    does not move; a second step adds another step of the same sign."""
    r = _router()
    r.train()
    _route(r, {"a": [0, 0, 0, 1], "b": [0, 1, 2, 3, 0, 1, 2, 3]})
    expected = GAMMA * torch.tensor([-1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(r.route_bias, expected)
    _route(r, {"a": [0, 0, 0, 1], "b": [0, 1, 2, 3, 0, 1, 2, 3]})
    torch.testing.assert_close(r.route_bias, 2 * expected)


def test_bias_steers_toward_balance_on_a_skewed_router():
    """A router whose logits favour expert 0 by +3 for every token (61 of 64 tokens go there) is balanced
    by the bias alone, without a loss or a gradient step: the point of the rule. Over the last 20 of 100
    steps every expert holds close to its 16 tokens."""
    from s3dist.model.router import RoutingPlan, Segment

    g = torch.Generator().manual_seed(0)
    r = _router(n=4, k=1, mods=("a",), d=4)
    x = torch.cat([torch.ones(64, 1), torch.randn(64, 3, generator=g)], 1)   # feature 0: a constant
    with torch.no_grad():
        w = torch.randn(4, 4, generator=g)
        w[:, 0] = 0.0
        w[0, 0] = 3.0
        r.proj[0].copy_(w)
    r.train()
    loads = []
    for _ in range(100):
        r.plan = RoutingPlan([Segment("a", 64, 1)])
        loads.append(r(x)[-1])
        r.plan = None
    assert loads[0][0] >= 56, loads[0]
    late = torch.stack(loads[-20:]).mean(0)
    assert late.max() <= 20 and late.min() >= 12, late
    assert r.route_bias[0] < 0 < r.route_bias[1:].min()


def test_selection_changes_gate_values_do_not():
    """A bias large enough to pick expert 3 changes the selected experts; each selected route's gate is still
    the unbiased probability (normalised over the token's kept routes), never probability + bias."""
    r = _router(n=4, k=2, mods=("a",))
    plain = _router(n=4, k=2, mods=("a",), balance="aux_loss")
    x = torch.randn(16, 4)
    probs = (x @ r.proj[0].t()).softmax(-1)
    with torch.no_grad():
        r.route_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    top_p, top_i = r.select(probs, r.route_bias)
    base_p, base_i = plain.select(probs, None)
    assert (top_i == 3).any(1).all()                      # expert 3 is now always chosen
    assert not torch.equal(top_i, base_i)                 # selection changed
    torch.testing.assert_close(top_p, probs.gather(1, top_i))
    # through the whole gate: DeepSpeed's gates are the selected probabilities normalised per token
    from s3dist.model.router import RoutingPlan, Segment

    r.eval()
    r.plan = RoutingPlan([Segment("a", 16, 1)])
    _, _, _, indices, _, gates, _ = r(x)
    r.plan = None
    sel = indices.t().long()
    torch.testing.assert_close(gates.t(), probs.gather(1, sel) / probs.gather(1, sel).sum(1, keepdim=True))
    assert (sel == 3).any(1).all()


def test_z_loss_does_not_depend_on_the_bias():
    """The z-loss is a property of the logits: a bias that selects a near-zero-probability expert first must
    not change it (nor make it inf through log p of that expert)."""
    r = _router(n=4, k=1, mods=("a",), compute_z_loss=True)
    plain = _router(n=4, k=1, mods=("a",), balance="aux_loss", compute_z_loss=True)
    with torch.no_grad():
        r.route_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    for m in (r, plain):
        m.eval()
        _route(m, {"a": [0, 1, 2, 0, 1]})   # logits 10 for the named expert: p(expert 3) ~ 4.5e-5
    assert torch.isfinite(r.z_loss)
    torch.testing.assert_close(r.z_loss, plain.z_loss)


def test_eval_and_frozen_updates_do_not_move_the_bias():
    """Evaluation (and Stage 3 calibration, which runs in eval mode) and a router with bias_updates off
    (Stage 2: build_engine turns it off when no expert trains) route with the bias but never move it;
    aux_loss / none routers have no bias at all."""
    r = _router()
    with torch.no_grad():
        r.route_bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.0, 0.0, 0.0, 0.0, 0.05]))
    before = r.route_bias.clone()
    r.eval()
    _route(r, {"a": [0, 0, 0, 1], "b": [3, 3]})
    torch.testing.assert_close(r.route_bias, before)
    r.train()
    r.bias_updates = False
    _route(r, {"a": [0, 0, 0, 1], "b": [3, 3]})
    torch.testing.assert_close(r.route_bias, before)
    r.bias_updates = True
    _route(r, {"a": [0, 0, 0, 1], "b": [3, 3]})
    assert not torch.equal(r.route_bias, before)
    for balance in ("aux_loss", "none"):
        assert "route_bias" not in _router(balance).state_dict()


def test_build_engine_freezes_the_bias_when_only_routers_train(tmp_path):
    """Stage 1's engine (all parameters) lets the bias move, Stage 2's (routers only) freezes it."""
    run_ranks(_engine_bias_updates, 1, tmp_path)


def _engine_bias_updates(rank, world, out_dir):
    from s3dist.config import RunConfig
    from s3dist.dist import attach_expert_groups, build_engine, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model, cfg.moe.expert_hidden, cfg.moe.balance = 16, 8, "bias"
    dims = make_dims(*init_distributed(cfg.dist), 1)
    model = S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe)
    attach_expert_groups(model, dims)
    kw = dict(lr=1e-3, total_steps=1, optim=cfg.optim, dist_cfg=cfg.dist, micro_batch=4)
    assert model.routers() and all(r.balance == "bias" for r in model.routers())
    build_engine(model, model.router_parameters(), **kw)
    assert not any(r.bias_updates for r in model.routers())
    build_engine(model, list(model.parameters()), **kw)
    assert all(r.bias_updates for r in model.routers())


def test_state_dict_compatibility_across_balance_settings():
    """The bias is a persistent buffer (saved with the model states); a checkpoint without one (an aux_loss
    run) loads into a bias router with the bias at zero, and a bias checkpoint loads into an aux_loss router
    (the bias is ignored): a --force-config switch of moe.balance resumes."""
    src = _router()
    with torch.no_grad():
        src.route_bias.copy_(torch.arange(8.0))
    dst = _router()
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst.route_bias, torch.arange(8.0))
    dst.load_state_dict(_router("aux_loss").state_dict())          # strict: no missing-key error
    torch.testing.assert_close(dst.route_bias, torch.zeros(8))
    plain = _router("aux_loss")
    plain.load_state_dict(src.state_dict())                         # strict: no unexpected-key error
    assert not hasattr(plain, "route_bias") or plain.route_bias is None


class _Batch:
    """What specialize_loss reads of a batch (the stream's Batch has more)."""

    def __init__(self, features, masks):
        self.features, self.masks = features, masks

    def __len__(self):
        return next(iter(self.features.values())).shape[0]


def test_aux_loss_is_applied_only_with_balance_aux_loss():
    """specialize_loss adds aux_loss_weight * L_aux with balance=aux_loss only; the term is logged always."""
    from s3dist.config import RunConfig
    from s3dist.model.encoder import S3Encoder
    from s3dist.objectives import specialize_loss

    totals = {}
    for balance in ("aux_loss", "bias", "none"):
        cfg = RunConfig()
        cfg.model.d_model, cfg.moe.expert_hidden, cfg.moe.balance, cfg.moe.aux_loss_weight = 16, 8, balance, 1.0
        cfg.stages.time_mask = cfg.stages.feature_dropout = cfg.stages.noise_std = 0.0
        torch.manual_seed(0)
        model = S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe)
        g = torch.Generator().manual_seed(1)
        batch = _Batch({"text": torch.randn(6, 4, 5, generator=g), "audio": torch.randn(6, 4, 3, generator=g)},
                       {m: torch.ones(6, 4, dtype=torch.bool) for m in ("text", "audio")})
        model.train()  # the balance loss exists in training; a first step routes alike (bias 0, no jitter)
        loss, terms = specialize_loss(model, batch, cfg, ["text", "audio"])
        totals[balance] = tuple(float(t.detach()) for t in (loss, terms["aux"], terms["intra"] + terms["cross"]))
    aux_total, aux, rest = totals["aux_loss"]
    assert aux > 0
    assert aux_total == pytest.approx(rest + aux, rel=1e-5)
    for balance in ("bias", "none"):
        total, logged_aux, rest_b = totals[balance]
        assert logged_aux == pytest.approx(aux, rel=1e-5)          # logged, same routing at bias 0
        assert total == pytest.approx(rest_b, rel=1e-5)            # not applied


@pytest.mark.parametrize("overrides, message", [
    (["moe.kind=topk", "moe.balance=bias", "stages.run=specialize"], "needs the S3 router"),
    (["moe.kind=dense", "moe.balance=bias", "stages.run=specialize"], "needs the S3 router"),
    (["moe.balance=biased"], "moe.balance"),
    (["moe.bias_update_rate=0"], "moe.bias_update_rate"),
])
def test_config_validation(overrides, message):
    from s3dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_config_accepts_the_options():
    from s3dist.config import load_config

    assert load_config(None, []).moe.balance == "aux_loss"      # the default until measured otherwise
    cfg = load_config(None, ["moe.balance=bias", "moe.bias_update_rate=0.01"])
    assert (cfg.moe.balance, cfg.moe.bias_update_rate) == ("bias", 0.01)
    assert load_config(None, ["moe.kind=topk", "moe.balance=none", "stages.run=specialize"]).moe.balance == "none"


# ---------------------------------------------------------------------------------------------
# Global, not local: 2 gloo ranks with different local loads
# ---------------------------------------------------------------------------------------------

# rank 0 routes a-tokens to [0, 0, 0, 1] (local mean 1: signs -1, 0, +1, +1), rank 1 to [2, 3, 3, 3]
# (signs +1, +1, 0, -1); the global load [3, 1, 1, 3] (mean 2) gives -1, +1, +1, -1: neither rank's.
LOCAL = [{"a": [0, 0, 0, 1], "b": [0, 1]}, {"a": [2, 3, 3, 3], "b": [0, 0, 2, 3]}]


def _bias_on_ranks(rank, world, out_dir):
    import torch.distributed as dist

    from s3dist.config import DistConfig
    from s3dist.dist import init_distributed

    init_distributed(DistConfig())
    out = {}
    for ep in (False, True):  # without an expert-parallel group (dp only) and with one spanning both ranks
        r = _router()
        if ep:
            r._set_ep_group(dist.new_group([0, 1]))
        r.train()
        for _ in range(2):
            _route(r, LOCAL[rank])
        out[ep] = r.route_bias.clone()
    return out


def test_bias_is_global_two_ranks_equal_one_rank_on_the_whole_batch(tmp_path):
    ranks = run_ranks(_bias_on_ranks, 2, tmp_path)
    ref = _router()
    ref.train()
    whole = {m: LOCAL[0][m] + LOCAL[1][m] for m in ("a", "b")}
    for _ in range(2):
        _route(ref, whole)
    # b: global [3, 1, 1, 1] (mean 1.5) -> -1, +1, +1, +1
    expected = 2 * GAMMA * torch.tensor([-1.0, 1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(ref.route_bias, expected)
    for out in ranks:
        for ep in (False, True):
            assert torch.equal(out[ep], ref.route_bias), (ep, out[ep])


# ---------------------------------------------------------------------------------------------
# A real 2-process run: the bias is in the checkpoint, exact resume keeps it, Stage 2 does not move it
# ---------------------------------------------------------------------------------------------

RUN = ["data.synth.num_train=512", "data.synth.num_val=128", "data.synth.num_test=128",
       "data.synth.modality_dims=12,8", "data.synth.seq_len=8", "data.batch_size=32", "model.d_model=32",
       "moe.expert_hidden=32", "logging.every_steps=5", "checkpoint.every_steps=10", "checkpoint.keep_last=10",
       "eval.run_at_end=false", "dist.ep_size=2", "moe.balance=bias", "moe.bias_update_rate=0.01",
       "stages.run=specialize,select", "stages.specialize_steps=20", "stages.select_steps=4"]
BIAS_KEY = "blocks.{}.ffn.moes.0.deepspeed_moe.gate.route_bias"


def _biases(ckpt: Path) -> dict[str, torch.Tensor]:
    from s3dist.checkpoint import consolidated_state_dict

    return {k: v for k, v in consolidated_state_dict(ckpt).items() if k.endswith(".route_bias")}


@pytest.mark.slow
def test_checkpoint_carries_the_bias_and_resume_matches_uninterrupted(tmp_path):
    """Uninterrupted run A; B is A's directory cut back to the step-10 checkpoint and resumed. The bias is in
    DeepSpeed's model-state file (not filed with the experts), has moved by step 10, is restored by the
    resume (every later loss and the final weights, bias included, equal A's) and stays fixed in Stage 2."""
    from tests import launching

    a = tmp_path / "a"
    p = launching.run_forked(a, RUN)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ckpts = a / "checkpoints"
    at10, at20 = ckpts / "step-00000010-specialize", ckpts / "step-00000020-specialize"
    final = ckpts / "step-00000024-select"
    b10, b20, b_end = _biases(at10), _biases(at20), _biases(final)
    assert set(b10) == {BIAS_KEY.format(i) for i in range(2)}, sorted(b10)
    for key in b10:
        assert b10[key].abs().min() > 0                      # moved from zero on every expert
        assert not torch.equal(b10[key], b20[key])           # and kept moving in Stage 1
        torch.testing.assert_close(b_end[key], b20[key], atol=0, rtol=0)  # Stage 2: frozen
    # B: the same run directory, as it was when the step-10 checkpoint had just been written
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("run.lock"))
    for d in (b / "checkpoints").iterdir():
        if d.is_dir() and d.name != at10.name:
            shutil.rmtree(d)
    (b / "checkpoints" / "latest").write_text(at10.name)
    p = launching.run_forked(b, RUN, extra=["--resume", "auto"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    from s3dist.checkpoint import consolidated_state_dict

    ref_w, got_w = consolidated_state_dict(final), consolidated_state_dict(b / "checkpoints" / final.name)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], atol=1e-6, rtol=0, msg=lambda s: f"{k}: {s}")
    losses = {}
    for run in (a, b):
        rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        losses[run.name] = {r["step"]: r["loss"] for r in rows}
    assert losses["a"].keys() == losses["b"].keys()
    for step, loss in losses["a"].items():
        if step > 10:
            assert abs(losses["b"][step] - loss) <= 1e-6, (step, losses["b"][step], loss)


def test_stage3_ranks_the_routes_the_biased_router_takes():
    """With balance=bias, Stage 3's token_pairs scores are the gates of the routes the router selects
    (probability + bias decides which), not the k highest unbiased probabilities."""
    from s3dist.config import MoEConfig
    from s3dist.model.moe import ExpertParallelMoE

    cfg = MoEConfig(kind="s3", num_experts=4, top_k=2, expert_hidden=8, balance="bias", bias_update_rate=GAMMA)
    layer = ExpertParallelMoE(4, ["a"], cfg, ep_size=1, ep_rank=0, layer_index=0)
    (router,) = layer.routers
    with torch.no_grad():
        router.route_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    x = torch.randn(3, 5, 4)
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, :2] = False
    scores = layer.prune_scores({"a": x}, {"a": valid}, "token_pairs")["a"]
    probs = (x.reshape(-1, 4) @ router.proj[0].t()).softmax(-1)
    want = probs.gather(1, (probs + router.route_bias).topk(2, dim=-1).indices)[valid.reshape(-1)].reshape(-1)
    torch.testing.assert_close(scores, want)
    assert not torch.allclose(scores, probs.topk(2, dim=-1).values[valid.reshape(-1)].reshape(-1))
