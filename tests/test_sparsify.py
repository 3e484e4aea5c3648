"""Stage 3 and Stage 2 semantics: the global keep threshold, keep-mask edge cases, router-only tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.multirank import run_ranks


def test_keep_mask_keeps_top_fraction_with_positional_ties():
    """keep_mask keeps ceil(p * numel) entries, highest first; equal scores are kept in batch order."""
    from s3dist.sparsify import keep_mask

    s = torch.tensor([[0.1, 0.5, 0.2], [0.5, 0.05, 0.05]])
    m = keep_mask(s, 0.5)  # ceil(3) = 3 kept: 0.5 (row 0), 0.5 (row 1), 0.2
    assert m.tolist() == [[0, 1, 1], [1, 0, 0]]
    assert keep_mask(s, 1.0).sum() == 6
    assert keep_mask(s, 0.01).tolist() == [[0, 1, 0], [0, 0, 0]]


def _global_threshold(rank, world, out_dir):
    from s3dist.dist import init_distributed
    from s3dist.config import DistConfig
    from s3dist.sparsify import global_keep_masks

    init_distributed(DistConfig())
    g = torch.Generator().manual_seed(3)
    full = {"text": torch.rand(10, 4, generator=g), "audio": torch.rand(10, 6, generator=g)}
    full["text"][7] = full["text"][2]  # exact ties across the rank boundary
    sizes = [6, 4] if world == 2 else [10]
    start = sum(sizes[:rank])
    mine = {m: s[start:start + sizes[rank]] for m, s in full.items()}
    return {p: global_keep_masks(mine, p) for p in (0.1, 0.3, 0.77)}


@pytest.mark.slow
def test_two_ranks_keep_exactly_the_pairs_of_one_rank(tmp_path):
    """Uneven shares of one batch on 2 ranks keep exactly the (sample, expert) pairs that one process
    holding the whole batch keeps, for every modality and p (one global threshold, ties included)."""
    one = run_ranks(_global_threshold, 1, tmp_path / "one")[0]
    two = run_ranks(_global_threshold, 2, tmp_path / "two")
    for p, masks in one.items():
        for m, mask in masks.items():
            assert torch.equal(torch.cat([two[0][p][m], two[1][p][m]]), mask), (p, m)
            assert int(mask.sum()) == int(torch.tensor(p * mask.numel()).ceil())


def _model(kind="s3"):
    from s3dist.config import RunConfig
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model = 16
    cfg.moe.kind = kind
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 8
    cfg.moe.drop_tokens = False
    torch.manual_seed(0)
    return S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe), cfg


def _keep_mask_cases(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims

    dims = make_dims(*init_distributed(DistConfig()), 1)
    model, _ = _model()
    attach_expert_groups(model, dims)
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(3, 5, 16, generator=g) for m in ("text", "audio")}
    valid = {m: torch.ones(3, 5, dtype=torch.bool) for m in x}
    layer = model.layers[0]
    with torch.no_grad():
        plain = layer(x, valid)[0]
        ones = layer(x, valid, {m: torch.ones(3, 4) for m in x})[0]
        zero_row = {m: torch.ones(3, 4) for m in x}
        zero_row["text"][1] = 0
        pruned = layer(x, valid, zero_row)[0]
    return {"plain": plain, "ones": ones, "pruned": pruned}


@pytest.mark.slow
def test_keep_mask_all_ones_changes_nothing_and_zero_row_gives_zero(tmp_path):
    """An all-ones keep-mask equals no mask exactly; a sample whose row is all zeros gets a zero expert
    output (no NaN) while the other samples are unchanged."""
    r = run_ranks(_keep_mask_cases, 1, tmp_path)[0]
    for m in r["plain"]:
        assert torch.equal(r["ones"][m], r["plain"][m])
    assert torch.equal(r["pruned"]["text"][1], torch.zeros_like(r["pruned"]["text"][1]))
    assert torch.isfinite(r["pruned"]["text"]).all()
    assert torch.equal(r["pruned"]["text"][0], r["plain"]["text"][0])
    assert torch.equal(r["pruned"]["audio"], r["plain"]["audio"])


def _router_only_step(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.trainer import select_loss

    make_dims(*init_distributed(DistConfig()), 1)
    model, cfg = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = build_engine(model, model.router_parameters(), lr=1e-2, total_steps=1, optim=cfg.optim,
                          dist_cfg=cfg.dist, micro_batch=8)
    n_opt = sum(p.numel() for g in engine.optimizer.param_groups for p in g["params"])

    class B:
        features = {"text": torch.randn(8, 5, 5), "audio": torch.randn(8, 5, 3)}
        masks = {"text": torch.ones(8, 5, dtype=torch.bool), "audio": torch.ones(8, 5, dtype=torch.bool)}
        labels = torch.tensor([0, 1] * 4)

        def __len__(self):
            return 8

    loss, _ = select_loss(engine, B(), cfg, ["text", "audio"])
    engine.backward(loss)
    engine.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    routers = {n for n, _ in model.named_parameters() if ".gate.proj." in n}
    total = sum(p.numel() for p in model.parameters())
    return {"changed": changed, "routers": routers, "n_opt": n_opt,
            "n_router": sum(p.numel() for p in model.router_parameters()), "total": total}


@pytest.mark.slow
def test_stage2_changes_only_router_parameters(tmp_path):
    """After a Stage-2 step only router weights changed, and the optimizer holds only router parameters
    (a few % of the model)."""
    r = run_ranks(_router_only_step, 1, tmp_path)[0]
    assert r["changed"] and r["changed"] == r["routers"]
    assert r["n_opt"] == r["n_router"] < 0.05 * r["total"]


def test_compactness_forms():
    """'entropy' cannot tell a collapse (every sample on one expert) from specialisation; 'mutual_info'
    prefers specialisation and is 0 for uniform routing."""
    from s3dist.losses import compactness

    collapse = torch.tensor([[1.0, 0, 0, 0]] * 4)
    special = torch.eye(4)
    uniform = torch.full((4, 4), 0.25)
    assert compactness(collapse) == pytest.approx(0, abs=1e-6) and compactness(special) == pytest.approx(0, abs=1e-6)
    assert compactness(special, "mutual_info") < compactness(collapse, "mutual_info") - 1.0
    assert compactness(uniform, "mutual_info") == pytest.approx(0.0, abs=1e-6)


def _bf16_model_path(rank, world, out_dir):
    from s3dist import losses
    from s3dist.config import DistConfig
    from s3dist.data.stream import Batch
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.evaluate import extract

    dims = make_dims(*init_distributed(DistConfig()), 1)
    model, _ = _model()
    attach_expert_groups(model, dims)
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the parameters (and only to them)
    g = torch.Generator().manual_seed(2)
    feats = {"text": torch.randn(6, 5, 5, generator=g), "audio": torch.randn(6, 5, 3, generator=g)}  # float32
    masks = {m: torch.ones(6, 5, dtype=torch.bool) for m in feats}
    out = model(feats, masks)
    emb = out.embeddings
    loss = (losses.info_nce(emb["text"], emb["audio"], 0.1)
            + losses.sup_con(emb["text"], emb["audio"], torch.tensor([0, 1, 0, 1, 1, 0]), 0.1)
            + losses.compactness(out.sample_scores["text"]))
    loss.backward()

    batch = Batch(ids=torch.arange(6), labels=torch.zeros(6, dtype=torch.long), features=feats, masks=masks,
                  concepts=None)
    res = extract(model, [batch], [0.5, 1.0], torch.device("cpu"))
    return {"emb_dtype": str(emb["text"].dtype), "loss_dtype": str(loss.dtype), "loss": float(loss.detach()),
            "grad_ok": all(p.grad is None or bool(torch.isfinite(p.grad.float()).all()) for p in model.parameters()),
            "extract_dtype": str(res["emb"][1.0].dtype), "extract_finite": bool(np.isfinite(res["emb"][0.5]).all()),
            "scores_dtype": str(res["scores"]["text"].dtype)}


@pytest.mark.slow
def test_bf16_parameters_take_float32_batches(tmp_path):
    """With bf16 parameters (DeepSpeed's bf16 mode casts parameters, not inputs) the encoder takes the
    stream's float32 features, the losses are computed in float32 and backpropagate, and extraction for
    the probe hands numpy float32 (numpy has no bfloat16)."""
    r = run_ranks(_bf16_model_path, 1, tmp_path)[0]
    assert r["emb_dtype"] == "torch.bfloat16" and r["loss_dtype"] == "torch.float32"
    assert np.isfinite(r["loss"]) and r["grad_ok"]
    assert r["extract_dtype"] == "float32" and r["extract_finite"] and r["scores_dtype"] == "float32"
