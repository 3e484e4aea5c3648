"""Evaluation: frozen encoder -> representations -> logistic-regression probe; Stage 3 sweep.

For every keep fraction p the encoder runs with Stage 3's sparsifier for p (`s3dist.sparsify`:
calibrated thresholds fixed on the training split first, or the per-batch rule). All ranks extract
their part of each split; results are gathered to rank 0 once per split, which fits scikit-learn
probes (regularisation chosen on validation) and writes `eval.json`, `sweep.csv`, `sweep.png` and
TensorBoard curves / routing heatmaps. Evaluation drops no token (the routers size capacity to the
demand in eval mode); the dropped fraction measured during extraction is reported and must be 0.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from s3dist import plots
from s3dist.config import RunConfig
from s3dist.sparsify import BatchSparsifier, FixedSparsifier, calibrate_sweep, pruned_layers, stage3_record

log = logging.getLogger("s3dist")


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def sparsifiers(cfg: RunConfig, model, train_batches, keep_fractions: list[float], device) -> dict:
    """{p: the Stage-3 sparsifier for p, or None at p = 1}. 'calibrated' fixes thresholds on
    `train_batches` here (a collective: every rank calls it with its part of the training split)."""
    st = cfg.stages
    layers = pruned_layers(len(model.layers), st.prune_layers)
    if st.prune_threshold == "calibrated":
        calibrated = calibrate_sweep(model, train_batches, [p for p in keep_fractions if p < 1.0], st.prune_unit,
                                     layers, device, st.prune_renormalize)
    out = {}
    for p in keep_fractions:
        if p >= 1.0:
            out[p] = None
        elif st.prune_threshold == "batch":
            out[p] = BatchSparsifier(p, st.prune_unit, layers, st.prune_renormalize)
        else:
            out[p] = FixedSparsifier(calibrated[p], st.prune_unit, st.prune_renormalize)
    return out


@torch.no_grad()
def extract(model, stream, sparsifier_by_p: dict, device) -> dict:
    """{p: embeddings [n, M*d]} plus labels, ids, concepts and p=1 routing scores, for this rank."""
    model.eval()
    emb = {p: [] for p in sparsifier_by_p}
    labels, ids, concepts, scores = [], [], [], {m: [] for m in model.modalities}
    for batch in stream:
        batch = batch.to(device)
        for p, sp in sparsifier_by_p.items():
            out = model(batch.features, batch.masks, sparsifier=sp)
            # .float(): numpy has no bfloat16 (a bf16-trained model's outputs)
            emb[p].append(torch.cat([out.embeddings[m] for m in model.modalities], dim=1).float().cpu())
            if sp is None:
                for m, s in out.sample_scores.items():
                    scores[m].append(s.float().cpu())
        labels.append(batch.labels.cpu())
        ids.append(batch.ids.cpu())
        if batch.concepts is not None:
            concepts.append(batch.concepts.cpu())
    res = {"emb": {p: torch.cat(v).numpy() for p, v in emb.items()},
           "labels": torch.cat(labels).numpy(), "ids": torch.cat(ids).numpy(),
           "concepts": torch.cat(concepts).numpy() if concepts else None,
           "scores": {m: torch.cat(v).numpy() for m, v in scores.items() if v}}
    model.train()
    return res


def dropped_fraction(model, dims) -> float:
    """Share of routes dropped by capacity since the routers' evaluation counters were last read (all ranks)."""
    routers = model.routers()
    if not routers:
        return 0.0
    c = torch.stack([r.pop_eval_counters() for r in routers]).sum(0).to(dims.device)
    if dims.world_size > 1:
        dist.all_reduce(c)
    routed, kept = c.tolist()
    return 0.0 if routed == 0 else 1.0 - kept / routed


def _gather_to_main(local: dict) -> dict | None:
    """One object gather per split; rank 0 gets every rank's rows ordered by sample id, others None.

    Ordered by id, not by rank: the probe's solver sums over rows, so its fit (and, for a sample near the
    decision boundary, an accuracy) would otherwise depend on how the split was divided among ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _by_id(local)
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if dist.get_rank() != 0:
        return None
    cat = lambda xs: np.concatenate(xs) if xs and xs[0] is not None else None  # noqa: E731
    return _by_id({"emb": {p: cat([x["emb"][p] for x in parts]) for p in local["emb"]},
                   "labels": cat([x["labels"] for x in parts]), "ids": cat([x["ids"] for x in parts]),
                   "concepts": cat([x["concepts"] for x in parts]),
                   "scores": {m: cat([x["scores"][m] for x in parts]) for m in local["scores"]}})


def _by_id(rows: dict) -> dict:
    order = np.argsort(rows["ids"], kind="stable")
    take = lambda x: None if x is None else x[order]  # noqa: E731
    return {"emb": {p: take(e) for p, e in rows["emb"].items()}, "labels": take(rows["labels"]),
            "ids": take(rows["ids"]), "concepts": take(rows["concepts"]),
            "scores": {m: take(s) for m, s in rows["scores"].items()}}


# ---------------------------------------------------------------------------------------------
# Probe
# ---------------------------------------------------------------------------------------------


def fit_probe(train_x, train_y, val_x, val_y, test_x, test_y, Cs: list[float], max_iter: int) -> dict:
    """Standardise, fit logistic regression for each C, keep the best on validation, report test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best = None
    for C in Cs:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        clf.fit(train_x, train_y)
        val = float(clf.score(val_x, val_y))
        if best is None or val > best[0]:
            best = (val, C, clf)
    val, C, clf = best
    return {"accuracy": float(clf.score(test_x, test_y)), "val_accuracy": val, "C": C}


def concept_mutual_information(choice: np.ndarray, concepts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per concept k, I(argmax expert ; concept k active) in nats (plug-in estimate): [K]."""
    mis = []
    for k in range(concepts.shape[1]):
        c = concepts[:, k].astype(int)
        joint = np.zeros((num_experts, 2))
        np.add.at(joint, (choice, c), 1)
        joint /= max(joint.sum(), 1)
        pe, pc = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        mis.append(float((joint[nz] * np.log(joint[nz] / (pe @ pc)[nz])).sum()))
    return np.asarray(mis)


def mutual_information(choice: np.ndarray, concepts: np.ndarray, num_experts: int) -> float:
    """Mean over concepts of I(argmax expert ; concept active), in nats."""
    return float(concept_mutual_information(choice, concepts, num_experts).mean())


def mi_by_group(per_concept: np.ndarray, modality: str, groups: dict[str, list[int]] | None) -> dict[str, float]:
    """Mean per-concept MI over each factor group a modality can see (factors data sets): its view of
    the shared factors, its own unique and nuisance factors, and the label's factors; plus all concepts."""
    out = {"all": float(per_concept.mean())}
    if groups:
        for name, key in (("shared", "shared"), ("unique", f"unique:{modality}"), ("nuisance", f"nuisance:{modality}"),
                          ("label", "label")):
            idx = groups.get(key)
            if idx:
                out[name] = float(per_concept[idx].mean())
    return out


# ---------------------------------------------------------------------------------------------
# Whole-run evaluation
# ---------------------------------------------------------------------------------------------


def _streams(cfg: RunConfig, data_url: str, rank: int, world: int):
    from s3dist.data.stream import evaluation_stream

    return {s: evaluation_stream(data_url, s, cfg.data, cfg.seed, rank, world) for s in ("train", "val", "test")}


def keep_fraction_list(cfg: RunConfig, extra: list[float] | None = None) -> list[float]:
    """The sweep's keep fractions: the configured (or given) ones, 1.0, and the run's own p."""
    ps = set(float(p) for p in (extra or cfg.eval.keep_fractions)) | {1.0}
    if extra is None and "sparsify" in cfg.stages.run and cfg.moe.kind == "s3":
        ps.add(float(cfg.stages.keep_fraction))
    if cfg.moe.kind != "s3":
        ps = {1.0}  # no S3 router: nothing to sparsify
    return sorted(ps)


def evaluate_run(cfg: RunConfig, dims, run_dir: Path, model, data_url: str, logger=None, step: int = 0,
                 keep_fractions: list[float] | None = None) -> dict | None:
    """Extract, probe and sweep; rank 0 writes the outputs and returns the result dict."""
    ps = keep_fraction_list(cfg, keep_fractions)
    streams = _streams(cfg, data_url, dims.rank, dims.world_size)
    dropped_fraction(model, dims)  # reset: count only this extraction
    by_p = sparsifiers(cfg, model, streams["train"], ps, dims.device)
    data = {s: _gather_to_main(extract(model, st, by_p, dims.device)) for s, st in streams.items()}
    eval_dropped = dropped_fraction(model, dims)
    random_mi = _random_router_mi(model, streams["test"], dims) if streams["test"].manifest.num_concepts else None
    if dims.rank != 0:
        return None
    tr, va, te = data["train"], data["val"], data["test"]
    sweep = []
    for p in ps:
        r = fit_probe(tr["emb"][p], tr["labels"], va["emb"][p], va["labels"], te["emb"][p], te["labels"],
                      cfg.eval.probe_Cs, cfg.eval.probe_max_iter)
        sweep.append({"keep_fraction": p, **r})
        log.info("probe: keep_fraction %.2f -> test accuracy %.4f (val %.4f, C=%g)", p, r["accuracy"],
                 r["val_accuracy"], r["C"])
    best = max(sweep, key=lambda r: r["val_accuracy"])  # chosen on validation, reported on test
    result = {
        "probe_accuracy": next(r["accuracy"] for r in sweep if r["keep_fraction"] == 1.0),
        "sweep": [{"keep_fraction": r["keep_fraction"], "accuracy": r["accuracy"],
                   "val_accuracy": r["val_accuracy"], "C": r["C"]} for r in sweep],
        "best_keep_fraction": best["keep_fraction"],
        "best_accuracy": best["accuracy"],
        "best_test_keep_fraction": max(sweep, key=lambda r: r["accuracy"])["keep_fraction"],
        "modalities": list(model.modalities),
        "moe_kind": cfg.moe.kind,
        "run_keep_fraction": cfg.stages.keep_fraction if "sparsify" in cfg.stages.run else 1.0,
        "stage3": stage3_record(cfg.stages, len(model.layers), by_p),
        "eval_dropped_fraction": eval_dropped,
        "step": step,
    }
    at_run_p = [r["accuracy"] for r in sweep if r["keep_fraction"] == result["run_keep_fraction"]]
    if at_run_p:
        result["run_keep_fraction_accuracy"] = at_run_p[0]
    if te["scores"] and te["concepts"] is not None:
        result["specialization"] = _specialization(te, random_mi, _concept_groups(streams["test"].manifest))
    write_outputs(run_dir, result, te, logger, step)
    return result


def _concept_groups(manifest) -> dict[str, list[int]] | None:
    """Factor groups of a factors-kind synthetic data set ({group: concept indices}, plus 'label')."""
    if getattr(manifest, "concept_groups", None) is None:
        return None
    return {**manifest.concept_groups, "label": list(manifest.label_concepts or [])}


def _specialization(te: dict, random_mi: dict | None, groups: dict | None) -> dict:
    """Expert/concept mutual information of the last MoE layer's top expert, trained router vs a random one;
    on factors data split by shared / unique / nuisance / label factors."""
    out = {}
    for m, s in te["scores"].items():
        per = concept_mutual_information(s.argmax(1), te["concepts"], s.shape[1])
        out[m] = {"mi_expert_concept": float(per.mean()), "mi_by_group": mi_by_group(per, m, groups)}
        if random_mi and m in random_mi:
            out[m]["mi_random_router"] = float(random_mi[m].mean())
            out[m]["mi_random_router_by_group"] = mi_by_group(random_mi[m], m, groups)
    return out


@torch.no_grad()
def _random_router_mi(model, stream, dims) -> dict | None:
    """Per-concept MI with freshly initialised routers: the 'no specialisation' reference."""
    routers = model.routers()
    if not routers or not hasattr(routers[0], "proj"):
        return None
    saved = [{k: v.clone() for k, v in r.state_dict().items()} for r in routers]
    gen = torch.Generator().manual_seed(12345)
    for r in routers:
        for w in r.proj:  # per modality [N, d]
            w.copy_(torch.randn(w.shape, generator=gen) * w.shape[1] ** -0.5)
    local = extract(model, stream, {1.0: None}, dims.device)
    for r, s in zip(routers, saved):
        r.load_state_dict(s)
    got = _gather_to_main(local)
    if got is None or got["concepts"] is None:
        return None
    return {m: concept_mutual_information(s.argmax(1), got["concepts"], s.shape[1]) for m, s in got["scores"].items()}


def write_outputs(run_dir: Path, result: dict, test: dict, logger, step: int) -> None:
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(run_dir / "eval.json")
    with open(run_dir / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["keep_fraction", "accuracy", "val_accuracy", "C"])
        for r in result["sweep"]:
            w.writerow([r["keep_fraction"], r["accuracy"], r["val_accuracy"], r["C"]])
    rgb = plots.plot_sweep({"this run": result["sweep"]}, run_dir / "sweep.png")
    if logger is not None:
        table = "| keep fraction p | test accuracy | val accuracy |\n|---|---|---|\n" + "\n".join(
            f"| {r['keep_fraction']:g} | {r['accuracy']:.4f} | {r['val_accuracy']:.4f} |" for r in result["sweep"])
        logger.summary(step, {"eval/probe_accuracy": result["probe_accuracy"],
                              "eval/best_accuracy": result["best_accuracy"],
                              "eval/best_keep_fraction": result["best_keep_fraction"]}, {"eval/sweep": table})
        logger.image(step, "eval/sweep", rgb)
        for m, s in test["scores"].items():
            logger.image(step, f"routing/{m}/expert_x_class", plots.class_heatmap(s, test["labels"], "class"))
            if test["concepts"] is not None:
                logger.image(step, f"routing/{m}/expert_x_concept", plots.concept_heatmap(s, test["concepts"]))
