"""Stage 3 and Stage 2 semantics: the global keep threshold, keep-mask edge cases, router-only tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.multirank import run_ranks


def test_threshold_keeps_the_top_fraction():
    """threshold() is the score of the ceil(p * n)-th best unit: p=0 keeps none (+inf), p=1 all (-inf)."""
    from s3dist.sparsify import threshold

    s = torch.tensor([0.1, 0.5, 0.2, 0.4, 0.05, 0.3, 0.6, 0.7, 0.8, 0.9])
    assert threshold(s, 0.3) == pytest.approx(0.65)     # between the kept 0.9, 0.8, 0.7 and the pruned 0.6
    assert int((s >= threshold(s, 0.3)).sum()) == 3
    assert int((s >= threshold(s, 0.25)).sum()) == 3    # ceil(2.5)
    assert threshold(s, 0.0) == float("inf") and threshold(s, 1.0) == float("-inf")
    assert threshold(torch.zeros(0), 0.5) == float("inf")


def _model(kind="s3", layers=2, **model):
    from s3dist.config import RunConfig
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model = 16
    cfg.model.num_layers = layers
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.moe.kind = kind
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 8
    cfg.moe.drop_tokens = False
    torch.manual_seed(0)
    return S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe), cfg


def _inputs(b=6, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    feats = {"text": torch.randn(b, t, 5, generator=g), "audio": torch.randn(b, t, 3, generator=g)}
    masks = {m: torch.ones(b, t, dtype=torch.bool) for m in feats}
    masks["text"][1, :2] = False
    masks["audio"][4, :3] = False
    return feats, masks


def _zero_ffn(ffn):
    """The reference for p = 0: the block's MoE contributes nothing (the residual stream passes)."""
    ffn.forward = lambda tokens, valid, prune=None: ({m: torch.zeros_like(x) for m, x in tokens.items()}, None, None)


def _ffn_input_case(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.sparsify import FixedSparsifier

    dims = make_dims(*init_distributed(DistConfig()), 1)
    feats, masks = _inputs()
    model, _ = _model(layers=3)
    attach_expert_groups(model, dims)
    model.eval()
    seen, calls = {}, []
    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, args) and None)
        block.ffn.register_forward_hook(lambda mod, args, out, i=i: calls.append(i) and None)
    prune = FixedSparsifier({0: {"text": 0.3, "audio": 0.3}}, "token_pairs")
    with torch.no_grad():
        model(feats, masks, sparsifier=prune)
        calls.clear()
        x, valid = model.ffn_input(feats, masks, 1, sparsifier=prune)
    return {"full": seen[1], "got": (x, valid), "ran": list(calls)}


def test_ffn_input_is_what_the_forward_feeds_that_layer_and_runs_nothing_after(tmp_path):
    """Stage 3's calibration reads layer l's routing scores from `S3Encoder.ffn_input`: the tokens the full
    forward (with the earlier layers pruned) hands to block l's MoE, with only the layers before it run."""
    res = run_ranks(_ffn_input_case, 1, tmp_path)[0]
    want_x, want_valid = res["full"][:2]  # the FFN is called with (tokens, valid, prune)
    got_x, got_valid = res["got"]
    for m in want_x:
        torch.testing.assert_close(got_x[m], want_x[m])
        assert torch.equal(got_valid[m], want_valid[m])
    assert res["ran"] == [0]


def _prune_cases(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.sparsify import BatchSparsifier, FixedSparsifier, pruned_layers

    dims = make_dims(*init_distributed(DistConfig()), 1)
    feats, masks = _inputs()
    res = {}
    for arch, rep, which in [("transformer", "residual", "all"), ("transformer", "residual", "last"),
                             ("stem", "residual", "all"), ("transformer", "expert_output", "last")]:
        model, _ = _model(arch=arch, representation=rep)
        attach_expert_groups(model, dims)
        model.eval()
        layers = pruned_layers(2, which)
        with torch.no_grad():
            plain = model(feats, masks).embeddings
            keep_all = model(feats, masks, sparsifier=FixedSparsifier({i: {"text": -float("inf"), "audio": -float("inf")}
                                                                       for i in layers}, "token_pairs")).embeddings
            p0_batch = model(feats, masks, sparsifier=BatchSparsifier(0.0, "token_pairs", layers)).embeddings
            p0_fixed = model(feats, masks, sparsifier=FixedSparsifier({i: {"text": float("inf"), "audio": float("inf")}
                                                                       for i in layers}, "token_pairs")).embeddings
            for i in layers:
                _zero_ffn(model.blocks[i].ffn)
            no_moe = model(feats, masks).embeddings
        res[(arch, rep, which)] = {"plain": plain, "keep_all": keep_all, "p0_batch": p0_batch, "p0_fixed": p0_fixed,
                                   "no_moe": no_moe}
    return res


@pytest.mark.slow
def test_p0_is_the_encoder_without_the_pruned_layers_experts(tmp_path):
    """p = 0 in token_pairs mode equals the encoder whose pruned MoE layers contribute nothing (the residual
    stream carries the tokens on); a threshold of -inf changes nothing. With the earlier 'expert_output'
    representation p = 0 deletes the representation itself (all zeros)."""
    res = run_ranks(_prune_cases, 1, tmp_path)[0]
    for case, r in res.items():
        for m in ("text", "audio"):
            assert torch.equal(r["keep_all"][m], r["plain"][m]), case
            torch.testing.assert_close(r["p0_batch"][m], r["no_moe"][m], atol=1e-6, rtol=0, msg=str(case))
            torch.testing.assert_close(r["p0_fixed"][m], r["no_moe"][m], atol=1e-6, rtol=0, msg=str(case))
            assert not torch.allclose(r["p0_batch"][m], r["plain"][m]), case  # the experts did contribute
    expert_out = res[("transformer", "expert_output", "last")]
    assert all(torch.count_nonzero(expert_out["p0_batch"][m]) == 0 for m in ("text", "audio"))


def _pair_counts(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.sparsify import BatchSparsifier

    dims = make_dims(*init_distributed(DistConfig()), 1)
    model, _ = _model(layers=1)
    attach_expert_groups(model, dims)
    model.eval()
    feats, masks = _inputs()
    router = model.routers()[0]
    out = {}
    with torch.no_grad():
        for unit in ("token_pairs", "sample_pairs"):
            for p in (1.0, 0.3, 0.0):
                router.pop_eval_counters()
                model(feats, masks, sparsifier=BatchSparsifier(p, unit, {0}))
                out[(unit, p)] = router.pop_eval_counters().tolist()
    out["valid_tokens"] = int(sum(m.sum() for m in masks.values()))
    return out


@pytest.mark.slow
def test_token_pairs_keep_the_top_fraction_of_selected_routes(tmp_path):
    """In token_pairs mode the unit is a route the router selected: p keeps ceil(p * tokens * k) of them per
    modality (here: the routes that reach an expert, counted by the router); sample_pairs keeps other counts.
    Evaluation drops nothing on top (routed == kept)."""
    r = run_ranks(_pair_counts, 1, tmp_path)[0]
    k, valid = 2, r["valid_tokens"]
    text, audio = 6 * 5 - 2, 6 * 5 - 3
    assert r[("token_pairs", 1.0)] == [valid * k, valid * k]
    assert r[("token_pairs", 0.3)][0] == math.ceil(0.3 * text * k) + math.ceil(0.3 * audio * k)
    assert r[("token_pairs", 0.0)][0] == 0
    assert r[("sample_pairs", 0.3)][0] != r[("token_pairs", 0.3)][0]
    for key, counts in r.items():
        if key != "valid_tokens":
            assert counts[0] == counts[1], key


def _batch_rule(rank, world, out_dir, ep):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.model.encoder import S3Encoder
    from s3dist.sparsify import BatchSparsifier

    dims = make_dims(*init_distributed(DistConfig()), ep)
    _, cfg = _model()
    torch.manual_seed(0)
    model = S3Encoder({"text": 5, "audio": 3}, cfg.model, cfg.moe, ep_size=ep, ep_rank=dims.ep_rank)
    attach_expert_groups(model, dims)
    model.eval()
    feats, masks = _inputs(b=8)
    sizes = [5, 3] if world == 2 else [8]
    a = sum(sizes[:rank])
    sl = slice(a, a + sizes[rank])
    with torch.no_grad():
        return {p: model({m: f[sl] for m, f in feats.items()}, {m: k[sl] for m, k in masks.items()},
                         sparsifier=BatchSparsifier(p, unit, {0, 1})).embeddings
                for p in (0.1, 0.3, 0.77) for unit in ("token_pairs",)}


@pytest.mark.slow
def test_batch_rule_on_two_ranks_equals_one_rank(tmp_path):
    """The paper's per-batch rule with one global threshold: uneven shares of a batch on 2 ranks (ep=2)
    give the embeddings one process holding the whole batch gives, for every p."""
    one = run_ranks(_batch_rule, 1, tmp_path / "one", 1)[0]
    two = run_ranks(_batch_rule, 2, tmp_path / "two", 2)
    for p, emb in one.items():
        for m, e in emb.items():
            torch.testing.assert_close(torch.cat([two[0][p][m], two[1][p][m]]), e, atol=1e-5, rtol=1e-5)


def _calibrated(rank, world, out_dir, data_url, eval_bs, rule):
    from s3dist.config import RunConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.evaluate import _streams, extract, sparsifiers
    from s3dist.model.encoder import S3Encoder

    cfg = RunConfig()
    cfg.model.d_model, cfg.model.num_layers = 16, 2
    cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden = 4, 2, 8
    cfg.data.eval_batch_size = eval_bs
    cfg.stages.prune_threshold = rule
    dims = make_dims(*init_distributed(cfg.dist), world)
    torch.manual_seed(0)
    model = S3Encoder({"text": 6, "audio": 4}, cfg.model, cfg.moe, ep_size=world, ep_rank=dims.ep_rank)
    attach_expert_groups(model, dims)
    streams = _streams(cfg, data_url, rank, world)
    by_p = sparsifiers(cfg, model, streams["train"], [0.3, 1.0], dims.device)
    got = extract(model, streams["test"], by_p, dims.device)
    thresholds = by_p[0.3].thresholds if rule == "calibrated" else None
    return {"ids": got["ids"], "emb": got["emb"][0.3], "thresholds": thresholds}


def _by_id(results):
    ids = np.concatenate([r["ids"] for r in results])
    emb = np.concatenate([r["emb"] for r in results])
    return emb[np.argsort(ids)]


@pytest.mark.slow
def test_calibrated_thresholds_do_not_depend_on_batch_or_ranks(tmp_path):
    """Calibrated Stage 3: 1 rank vs 2 ranks (ep=2) and eval batch 32 vs 256 give the same thresholds and the
    same test embeddings at p = 0.3. The paper's per-batch rule does depend on the batch size (the control
    that shows the comparison can fail)."""
    from s3dist.config import SynthConfig
    from s3dist.data.synth import generate

    url = str(tmp_path / "data")
    generate(url, SynthConfig(num_train=200, num_val=40, num_test=90, modality_dims=[6, 4], seq_len=6,
                              rows_per_shard=50))
    one_256 = run_ranks(_calibrated, 1, tmp_path / "a", url, 256, "calibrated")
    one_32 = run_ranks(_calibrated, 1, tmp_path / "b", url, 32, "calibrated")
    two_32 = run_ranks(_calibrated, 2, tmp_path / "c", url, 32, "calibrated")
    ref = _by_id(one_256)
    for other in (one_32, two_32):
        np.testing.assert_allclose(_by_id(other), ref, atol=1e-5, rtol=1e-5)
        for layer, per in other[0]["thresholds"].items():
            for m, t in per.items():
                assert t == pytest.approx(one_256[0]["thresholds"][layer][m], abs=1e-6)
    batch_256 = _by_id(run_ranks(_calibrated, 1, tmp_path / "d", url, 256, "batch"))
    batch_32 = _by_id(run_ranks(_calibrated, 1, tmp_path / "e", url, 32, "batch"))
    assert np.abs(batch_256 - batch_32).max() > 1e-3



def _calibrate_the_long_way(model, batches, p, unit, layers):
    """The definition of the calibrated thresholds, with nothing shared or cut short: per pruned layer in order,
    a full forward of every batch with the layers before it pruned at their thresholds, then that layer's
    threshold for p."""
    from s3dist.sparsify import FixedSparsifier, threshold

    fixed = {}
    for target in sorted(layers):
        scores = {m: [] for m in model.modalities}

        class Record(FixedSparsifier):
            def prune_spec(self, layer, moe, x, valid):
                if layer == target:
                    for m, s in moe.prune_scores(x, valid, unit).items():
                        scores[m].append(s)
                    return None
                return super().prune_spec(layer, moe, x, valid)

        for b in batches:
            model(b.features, b.masks, sparsifier=Record(dict(fixed), unit))
        fixed[target] = {m: threshold(torch.cat(s), p) for m, s in scores.items()}
    return fixed


CALIBRATION_PS = (0.0, 0.3, 0.5, 0.9, 1.0)


def _calibration_cases(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.data.stream import Batch
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.sparsify import calibrate, calibrate_sweep

    dims = make_dims(*init_distributed(DistConfig()), 1)
    batches = []
    for seed, b in ((1, 6), (2, 5), (3, 7)):  # uneven batch sizes
        feats, masks = _inputs(b=b, seed=seed)
        batches.append(Batch(ids=torch.arange(b), labels=torch.zeros(b, dtype=torch.long), features=feats,
                             masks=masks, concepts=None))
    res = {}
    for num_layers, layers, unit in [(2, {0, 1}, "token_pairs"), (2, {1}, "token_pairs"),
                                     (2, {0, 1}, "sample_pairs"), (3, {0, 1, 2}, "token_pairs")]:
        model, _ = _model(layers=num_layers)
        attach_expert_groups(model, dims)
        model.eval()
        moe_calls = []
        for moe in model.moe_layers():
            moe.register_forward_hook(lambda *_: moe_calls.append(1))
        with torch.no_grad():
            want = {p: _calibrate_the_long_way(model, batches, p, unit, layers) for p in CALIBRATION_PS}
            moe_calls.clear()
            sweep = calibrate_sweep(model, batches, CALIBRATION_PS, unit, layers, "cpu")
            sweep_moe_calls = len(moe_calls)
            one = calibrate(model, batches, 0.3, unit, layers, "cpu")
        res[(num_layers, tuple(sorted(layers)), unit)] = {"want": want, "sweep": sweep, "one": one,
                                                          "sweep_moe_calls": sweep_moe_calls}
    return res


@pytest.mark.slow
def test_calibrate_sweep_equals_the_definition(tmp_path):
    """calibrate_sweep (the first pruned layer's scores collected once for every p, each pass stopped at its
    layer's router) gives exactly the thresholds of the definition run the long way, for 2 and 3 layers, all
    or the last layer pruned, both units, p from 0 to 1; calibrate(p) is the sweep's entry for p. For 2 pruned
    layers the sweep runs one MoE layer per batch and p (the definition: 4)."""
    res = run_ranks(_calibration_cases, 1, tmp_path)[0]
    for case, r in res.items():
        assert r["sweep"] == r["want"], case
        assert r["one"] == r["want"][0.3], case
        assert r["want"][0.5][max(case[1])] != r["want"][0.9][max(case[1])], case  # later layers depend on p
    assert res[(2, (0, 1), "token_pairs")]["sweep_moe_calls"] == len(CALIBRATION_PS) * 3

def _eval_drops(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.evaluate import dropped_fraction

    dims = make_dims(*init_distributed(DistConfig()), 1)
    model, _ = _model(kind="s3")
    for r in model.routers():
        r.drop_tokens, r.capacity_factor, r.min_capacity = True, 0.25, 1
    attach_expert_groups(model, dims)
    feats, masks = _inputs(b=16)
    with torch.no_grad():
        model.train()
        [r.pop_load_counters() for r in model.routers()]  # start from zero
        model(feats, masks)
        train_counts = [r.pop_load_counters() for r in model.routers()]
        model.eval()
        dropped_fraction(model, dims)
        model(feats, masks)
        eval_dropped = dropped_fraction(model, dims)
    n = model.routers()[0].num_experts
    train_dropped = 1 - sum(float(c[n:2 * n].sum()) for c in train_counts) / sum(float(c[:n].sum()) for c in train_counts)
    return {"train": train_dropped, "eval": eval_dropped}


@pytest.mark.slow
def test_evaluation_drops_no_token(tmp_path):
    """With a capacity factor that drops routes in training, the same forward in evaluation drops none: every
    method's representations are extracted with all their routes (eval.json reports the fraction)."""
    r = run_ranks(_eval_drops, 1, tmp_path)[0]
    assert r["train"] > 0.2
    assert r["eval"] == 0.0


def _router_only_step(rank, world, out_dir):
    from s3dist.config import DistConfig
    from s3dist.dist import build_engine, init_distributed, make_dims
    from s3dist.objectives import select_loss

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
    routers = {n for n, _ in model.named_parameters() if n.endswith(".gate.proj")}
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
    from s3dist.sparsify import BatchSparsifier

    res = extract(model, [batch], {0.5: BatchSparsifier(0.5, "token_pairs", {0, 1}), 1.0: None}, torch.device("cpu"))
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
