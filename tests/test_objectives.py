"""S3's objectives: the vMF compactness against a hand computation, every loss on 2 ranks against 1 rank
holding the whole batch (values and gradients), and what Stage 2's loss contains by default."""

from __future__ import annotations

import math

import pytest
import torch

from tests.multirank import run_ranks


def test_vmf_compactness_hand_computed():
    """4 samples, 2 classes, 2-d embeddings: L[a->b] = -mean_i <unit a_i, normalised class mean of unit b>."""
    from s3dist.losses import vmf_compactness

    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [-1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 5.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    # class 0 in b: mean of (1, 0) and (0, 1) -> direction (1, 1)/sqrt2; class 1: mean of (0, 1) and (1, 1)/sqrt2
    r = 1 / math.sqrt(2)
    c1 = torch.tensor([r / 2, (1 + r) / 2])
    c1 = c1 / c1.norm()
    expected = -(r + r + (0.6 * c1[0] + 0.8 * c1[1]) + (-c1[0])) / 4
    assert float(vmf_compactness(a, b, y)) == pytest.approx(float(expected), abs=1e-6)
    # pulling towards the other modality's class direction, not towards a's own: swapping a and b differs
    assert float(vmf_compactness(b, a, y)) != pytest.approx(float(expected), abs=1e-3)
    # perfect alignment with the class directions reaches the minimum -1
    assert float(vmf_compactness(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[5.0, 0.0], [1.0, 0.0]]),
                                 torch.tensor([0, 0]))) == pytest.approx(-1.0)



def test_augment_draws_each_row_its_own_view():
    """Stage 1 augments both views in one call: every row gets its own time mask, dropout and noise (the two
    halves differ), masks only lose real steps and keep at least one per sample that had one, masked steps are
    zero (also where the features were NaN), and about time_mask of the real steps are dropped."""
    from s3dist.config import StagesConfig
    from s3dist.objectives import augment

    torch.manual_seed(0)
    b, t, d = 64, 20, 8
    x = torch.randn(b, t, d)
    mask = torch.arange(t).expand(b, t) >= torch.randint(0, t, (b, 1))  # front padding, as MultiBench pads
    mask[0] = False  # a sample with no real step stays empty
    x[~mask] = float("nan")
    st = StagesConfig(time_mask=0.5, feature_dropout=0.2, noise_std=0.1)
    out, keep = augment(x.repeat(2, 1, 1), mask.repeat(2, 1), st)
    m2 = mask.repeat(2, 1)
    assert out.shape == (2 * b, t, d) and keep.shape == (2 * b, t)
    assert not (keep & ~m2).any()                                   # only real steps are kept
    assert keep.any(1)[m2.any(1)].all() and not keep[0].any()       # never a sample masked away entirely
    assert (out[~keep] == 0).all() and torch.isfinite(out).all()
    assert not torch.equal(keep[:b], keep[b:]) and not torch.equal(out[:b], out[b:])
    dropped = (m2 & ~keep).sum() / m2.sum()
    assert 0.4 < float(dropped) < 0.5  # 0.5 drawn, minus the steps kept so that no sample is empty


B, D = 8, 6


def _losses(rank, world, out_dir, torch_before_2_13=False):
    """Each loss on this rank's slice of one global batch; returns values and input gradients. With
    `torch_before_2_13` the process has no `all_gather_single` (as torch < 2.13, which pyproject.toml
    admits): the gathers must go through `all_gather_into_tensor`, and are counted."""
    import torch.distributed as dist

    from s3dist import losses
    from s3dist.config import DistConfig
    from s3dist.dist import init_distributed

    init_distributed(DistConfig())
    old_gathers = []
    if torch_before_2_13:
        del dist.all_gather_single
        real = dist.all_gather_into_tensor
        dist.all_gather_into_tensor = lambda *a, **k: (old_gathers.append(1), real(*a, **k))[1]
    g = torch.Generator().manual_seed(5)
    a_all, b_all = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    y_all = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    out = {}
    for name, fn in {"info_nce": lambda a, b, y: losses.info_nce(a, b, 0.1),
                     "sup_con": lambda a, b, y: losses.sup_con(a, b, y, 0.1),
                     "vmf": losses.vmf_compactness}.items():
        a = a_all[sl].clone().requires_grad_(True)
        b = b_all[sl].clone().requires_grad_(True)
        loss = fn(a, b, y_all[sl])
        loss.backward()
        out[name] = {"loss": float(loss.detach()), "ga": a.grad.clone(), "gb": b.grad.clone()}
    out["old_gathers"] = len(old_gathers)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("torch_before_2_13", [False, True])
def test_losses_on_two_ranks_equal_one_rank_with_the_whole_batch(tmp_path, torch_before_2_13):
    """Negatives, positives and class means come from the global batch: the mean over 2 ranks of each
    loss equals the 1-rank loss, and each rank's input gradients are world x the 1-rank gradients of its
    rows (DeepSpeed then averages parameter gradients over the ranks), to 1e-6. Also on a torch without
    `all_gather_single` (< 2.13), through `all_gather_into_tensor`."""
    one = run_ranks(_losses, 1, tmp_path / "one")[0]
    two = run_ranks(_losses, 2, tmp_path / "two", torch_before_2_13)
    # info_nce: one gather; sup_con, vmf: embeddings + labels
    assert [r.pop("old_gathers") for r in two] == ([5, 5] if torch_before_2_13 else [0, 0])
    one.pop("old_gathers")
    for name, ref in one.items():
        assert (two[0][name]["loss"] + two[1][name]["loss"]) / 2 == pytest.approx(ref["loss"], abs=1e-6), name
        for key in ("ga", "gb"):
            got = torch.cat([two[0][name][key], two[1][name][key]]) / 2
            torch.testing.assert_close(got, ref[key], atol=1e-6, rtol=1e-5, msg=lambda s: f"{name} {key}: {s}")


def _stage2_terms(rank, world, out_dir, overrides):
    from s3dist.config import DistConfig, load_config
    from s3dist.data.stream import Batch
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder
    from s3dist.objectives import select_loss

    dims = make_dims(*init_distributed(DistConfig()), 1)
    cfg = load_config(None, ["model.d_model=16", "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=8",
                             *overrides])
    torch.manual_seed(0)
    model = S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe)
    attach_expert_groups(model, dims)
    g = torch.Generator().manual_seed(3)
    feats = {"text": torch.randn(8, 4, 5, generator=g), "audio": torch.randn(8, 4, 3, generator=g)}
    batch = Batch(ids=torch.arange(8), labels=torch.tensor([0, 1] * 4), features=feats,
                  masks={m: torch.ones(8, 4, dtype=torch.bool) for m in feats}, concepts=None)
    loss, terms = select_loss(model, batch, cfg, ["text", "audio"])
    return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}


@pytest.mark.slow
def test_stage2_default_is_supcon_plus_vmf_without_balance(tmp_path):
    """By default Stage 2 = SupCon + compact_weight * vMF compactness: the balance loss is measured (logged)
    but not in the loss; stages.select_balance_weight puts it back."""
    from s3dist.config import StagesConfig

    r = run_ranks(_stage2_terms, 1, tmp_path / "a", [])[0]
    w = StagesConfig().compact_weight
    assert r["aux"] > 0
    assert r["loss"] == pytest.approx(r["supcon"] + w * r["compact"], abs=1e-6)
    assert -1.0 <= r["compact"] <= 1.0  # minus a mean cosine similarity
    b = run_ranks(_stage2_terms, 1, tmp_path / "b", ["stages.select_balance_weight=0.5"])[0]
    assert b["loss"] == pytest.approx(b["supcon"] + w * b["compact"] + 0.5 * b["aux"], abs=1e-6)
    e = run_ranks(_stage2_terms, 1, tmp_path / "c", ["stages.compactness=entropy"])[0]
    assert e["compact"] > 0  # the routing-entropy ablation is a different quantity


def _contrastive(rank, world, out_dir, stage):
    """A stage's loss on this rank's slice (the encoder replaced by fixed embeddings, so only the loss code
    runs) against the same terms from the one-at-a-time primitives; and the all-gathers it issues."""
    import torch.distributed as dist

    from s3dist import losses
    from s3dist.config import DistConfig, RunConfig
    from s3dist.dist import init_distributed
    from s3dist.model.encoder import EncoderOutput
    from s3dist.objectives import select_loss, specialize_loss

    init_distributed(DistConfig())
    mods = ["text", "audio", "vision"]
    g = torch.Generator().manual_seed(11)
    full = {(m, v): torch.randn(B, D, generator=g) for m in mods for v in (1, 2)}
    labels = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    cfg = RunConfig()
    st = cfg.stages

    def leaves():
        return {k: e[sl].clone().requires_grad_(True) for k, e in full.items()}

    emb = leaves()
    batch = type("B", (), {"features": {m: torch.zeros(per, 2, 1) for m in mods},
                           "masks": {m: torch.ones(per, 2, dtype=torch.bool) for m in mods},
                           "labels": labels[sl], "concepts": None, "__len__": lambda self: per})()
    if stage == "specialize":
        def encoder(f, m):  # both views in one call, as specialize_loss makes it
            return EncoderOutput({x: torch.cat([emb[(x, 1)], emb[(x, 2)]]) for x in mods}, None, None, {})
    else:
        def encoder(f, m):
            return EncoderOutput({x: emb[(x, 1)] for x in mods}, None, None, {})
    gathers = []
    real = dist.all_gather_single
    dist.all_gather_single = lambda *a, **k: (gathers.append(1), real(*a, **k))[1]
    try:
        loss, _ = (specialize_loss if stage == "specialize" else select_loss)(encoder, batch, cfg, mods)
    finally:
        dist.all_gather_single = real
    loss.backward()
    e = leaves()
    prs = losses.pairs(mods)
    if stage == "specialize":
        intra = sum(losses.info_nce(e[(m, 1)], e[(m, 2)], st.temperature) for m in mods) / len(mods)
        cross = sum(losses.info_nce(e[(a, 1)], e[(b, 1)], st.temperature) for a, b in prs) / len(prs)
        ref = st.intra_weight * intra + st.cross_weight * cross
    else:
        directed = [d for a, b in prs for d in ((a, b), (b, a))]
        y = labels[sl]
        supcon = sum(losses.sup_con(e[(a, 1)], e[(b, 1)], y, st.temperature) for a, b in directed) / len(directed)
        comp = sum(losses.vmf_compactness(e[(a, 1)], e[(b, 1)], y) for a, b in directed) / len(directed)
        ref = st.supcon_weight * supcon + st.compact_weight * comp
    ref.backward()
    return {"loss": float(loss), "ref": float(ref), "gathers": len(gathers),
            "grads": {k: emb[k].grad for k in emb if emb[k].grad is not None},
            "ref_grads": {k: e[k].grad for k in e if e[k].grad is not None}}


@pytest.mark.slow
@pytest.mark.parametrize("stage,gathers", [("specialize", 1), ("select", 2)])
def test_stage_losses_gather_every_embedding_once(tmp_path, stage, gathers):
    """The contrastive terms of a stage (3 modalities: Stage 1's 6 InfoNCE terms, Stage 2's 6 directed SupCon
    and 6 vMF terms) normalise and all-gather the embeddings once, in one collective (Stage 2: one more for
    the labels), instead of two gathers per term; loss and gradients equal the terms computed one at a time
    (2 real gloo ranks)."""
    for r in run_ranks(_contrastive, 2, tmp_path, stage):
        assert r["gathers"] == gathers
        assert r["loss"] == pytest.approx(r["ref"], abs=1e-6)
        assert r["grads"].keys() == r["ref_grads"].keys() and r["grads"]
        for k, g in r["ref_grads"].items():
            torch.testing.assert_close(r["grads"][k], g, atol=1e-6, rtol=1e-5, msg=lambda s: f"{k}: {s}")
