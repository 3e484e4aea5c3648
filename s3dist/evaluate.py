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
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from s3dist.config import RunConfig
from s3dist.sparsify import BatchSparsifier, FixedSparsifier, calibrate_sweep, pruned_layers

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
    from s3dist.data.stream import ShardStream

    mk = lambda split: ShardStream(data_url, split, batch_size=cfg.data.eval_batch_size, rank=rank,  # noqa: E731
                                   world_size=world, modalities=cfg.data.modalities or None, seed=cfg.seed,
                                   shuffle_buffer=0, drop_last=False, nonfinite=cfg.data.nonfinite,
                                   prefetch=cfg.data.prefetch, read_threads=cfg.data.read_threads)
    return {s: mk(s) for s in ("train", "val", "test")}


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
        "stage3": stage3_settings(cfg, model, by_p),
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


def stage3_settings(cfg: RunConfig, model, by_p: dict) -> dict:
    """What eval.json records about Stage 3: the rule, and each p's calibrated thresholds (null = +inf,
    nothing kept; a threshold of -inf, everything kept, is written as the string '-inf')."""
    st = cfg.stages
    out = {"prune_unit": st.prune_unit, "prune_layers": st.prune_layers, "prune_threshold": st.prune_threshold,
           "prune_renormalize": st.prune_renormalize,
           "pruned_layer_indices": sorted(pruned_layers(len(model.layers), st.prune_layers))}
    fixed = {p: sp.thresholds for p, sp in by_p.items() if isinstance(sp, FixedSparsifier)}
    if fixed:
        enc = lambda t: None if t == float("inf") else ("-inf" if t == float("-inf") else t)  # noqa: E731
        out["thresholds"] = {str(p): {str(layer): {m: enc(t) for m, t in per.items()} for layer, per in th.items()}
                             for p, th in fixed.items()}
    return out


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
    rgb = plot_sweep({"this run": result["sweep"]}, run_dir / "sweep.png")
    if logger is not None:
        table = "| keep fraction p | test accuracy | val accuracy |\n|---|---|---|\n" + "\n".join(
            f"| {r['keep_fraction']:g} | {r['accuracy']:.4f} | {r['val_accuracy']:.4f} |" for r in result["sweep"])
        logger.summary(step, {"eval/probe_accuracy": result["probe_accuracy"],
                              "eval/best_accuracy": result["best_accuracy"],
                              "eval/best_keep_fraction": result["best_keep_fraction"]}, {"eval/sweep": table})
        logger.image(step, "eval/sweep", rgb)
        for m, s in test["scores"].items():
            logger.image(step, f"routing/{m}/expert_x_class", _heatmap(s, test["labels"], "class"))
            if test["concepts"] is not None:
                logger.image(step, f"routing/{m}/expert_x_concept", _concept_heatmap(s, test["concepts"]))


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)
# ---------------------------------------------------------------------------------------------


def _fig_to_rgb(fig) -> np.ndarray:
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return rgb


def plot_sweep(curves: dict[str, list[dict]], path: Path, std: dict[str, list[float]] | None = None) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, rows in curves.items():
        xs = [r["keep_fraction"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        if std and name in std:
            s = 100 * np.asarray(std[name])
            ax.fill_between(xs, np.asarray(ys) - s, np.asarray(ys) + s, alpha=0.2)
        full = [100 * r["accuracy"] for r in rows if r["keep_fraction"] == 1.0]
        if full:
            ax.axhline(full[0], linestyle="--", linewidth=1, color=ax.lines[-1].get_color(), alpha=0.6)
    ax.set_xlabel("kept fraction p of (sample, expert) routing pairs")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_title("S3 sparsity sweep (dashed: p = 1.0)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return _fig_to_rgb(fig)


def _heatmap(scores: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    classes = np.unique(labels)
    mat = np.stack([scores[labels == c].mean(0) for c in classes])
    return _draw(mat, [f"{what} {c}" for c in classes])


def _concept_heatmap(scores: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    mat = np.stack([scores[concepts[:, k] > 0].mean(0) if (concepts[:, k] > 0).any() else np.zeros(scores.shape[1])
                    for k in range(concepts.shape[1])])
    return _draw(mat, [f"concept {k}" for k in range(concepts.shape[1])])


def _draw(mat: np.ndarray, rows: list[str]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * mat.shape[1], 1 + 0.35 * mat.shape[0]), dpi=100)
    im = ax.imshow(mat, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(mat.shape[1]), [f"e{e}" for e in range(mat.shape[1])])
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _fig_to_rgb(fig)


# ---------------------------------------------------------------------------------------------
# CLI: s3dist eval / s3dist sweep (single process; loads a checkpoint or an export, ep_size=1)
# ---------------------------------------------------------------------------------------------


# Keys an evaluation may change: they decide how representations are extracted and probed, never the
# weights' shapes.
EVAL_OVERRIDE_PREFIXES = ("data.eval_batch_size", "data.prefetch", "data.read_threads", "data.nonfinite", "eval.",
                          "stages.keep_fraction", "stages.prune_")


def apply_eval_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`KEY=VALUE` evaluation settings on top of the run's config; other keys are refused by name."""
    from s3dist.config import ConfigError, _apply, _nest, parse_overrides, validate

    dotted = parse_overrides(overrides)
    bad = [k for k in dotted if not k.startswith(EVAL_OVERRIDE_PREFIXES)]
    if bad:
        raise ConfigError(f"evaluation cannot override {bad}: only keys starting with "
                          f"{list(EVAL_OVERRIDE_PREFIXES)} change how a trained model is evaluated")
    _apply(cfg, "", _nest(dotted), from_cli=True)
    validate(cfg)
    return cfg


def load_for_eval(run: Path | None, model_file: Path | None, data_path: str | None = None):
    """(cfg, model, data_url, step) from a run's newest checkpoint, an exported folder or an exported safetensors
    file; step is the checkpoint's global step (0 for an export, which does not record it)."""
    from s3dist import checkpoint as ckpt_io
    from s3dist.config import ConfigError, from_dict, to_dict
    from s3dist.data.manifest import read_manifest
    from s3dist.model.encoder import S3Encoder

    if model_file is not None and Path(model_file).is_dir():
        # An exported folder records its run config and where the training data was (or says which --data)
        from s3dist.pretrained import S3Encoder as Pretrained

        model = Pretrained.from_pretrained(model_file)
        data_url = model.data_url(data_path, what=f"'{model_file}'")
        model.check_manifest(read_manifest(data_url), data_url)
        return from_dict(to_dict(model.run_config)), model, data_url, 0  # a copy: eval overrides stay off the model
    step = 0
    if model_file is not None:
        cfg_dict, state = ckpt_io.load_export(model_file)
    else:
        ck = ckpt_io.find_latest(run)
        if ck is None:
            raise ckpt_io.CheckpointError(f"no complete checkpoint in '{run}/checkpoints'; train first or pass --model")
        meta = ckpt_io.read_meta(ck)
        cfg_dict, step = meta["config"], meta["state"]["global_step"]
        state = ckpt_io.consolidated_state_dict(ck)
    cfg = from_dict(cfg_dict)
    if not (data_path or cfg.data.path or run):
        raise ConfigError(f"'{model_file}' was trained on the embedded synthetic data set, which is not part of an "
                          f"export: pass --data RUN_DIR/data (the run directory it was exported from)")
    data_url = data_path or cfg.data.path or str(run / "data")
    manifest = read_manifest(data_url)
    mods = cfg.data.modalities or list(manifest.modalities)
    model = S3Encoder({m: manifest.modalities[m].shape[-1] for m in mods}, cfg.model, cfg.moe, ep_size=1, ep_rank=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ckpt_io.CheckpointError(f"weights do not fit the model built from the saved config: missing "
                                      f"{missing[:5]}, unexpected {unexpected[:5]}")
    return cfg, model, data_url, step


def _cli_eval(args) -> int:
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims

    ps = _keep_fractions_arg(args)  # before anything loads: a typo costs nothing
    cfg, model, data_url, step = load_for_eval(args.run, args.model, args.data)
    apply_eval_overrides(cfg, args.overrides)
    dims = make_dims(*init_distributed(cfg.dist), 1)
    attach_expert_groups(model, dims)
    # an export folder holds its own evaluation; a single-file export's go next to the file
    out_dir = getattr(args, "out", None) or args.run or (args.model if args.model.is_dir() else args.model.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    holds_run = (out_dir / "config.yaml").exists()
    if holds_run:  # a run directory: a job may be training in it, and writes its own eval.json at the end
        _lock_run_dir(out_dir, cfg, dims.rank == 0)
    try:
        return _evaluate_into(out_dir, cfg, dims, model, data_url, step, ps)
    finally:
        if holds_run:
            from s3dist import runlock

            runlock.release(out_dir)


def _lock_run_dir(run_dir: Path, cfg: RunConfig, is_main: bool) -> None:
    """Hold the run directory's lock (`s3dist.runlock`) while the evaluation writes into it, as a training job
    does: an evaluation of a run that is still training is refused, naming the job, rather than writing beside
    it (its own final evaluation would replace this one, from another checkpoint)."""
    from s3dist import runlock

    try:
        runlock.acquire_collective(run_dir, cfg.checkpoint.lock_stale_s, is_main)
    except runlock.RunLockError as e:
        raise runlock.RunLockError(f"{e}. To evaluate its newest checkpoint now, write the evaluation elsewhere: "
                                   f"--out DIR") from None


def _evaluate_into(out_dir: Path, cfg: RunConfig, dims, model, data_url: str, step: int, ps) -> int:
    if ps is not None and (out_dir / "eval.json").exists():
        # extend the evaluation there rather than replace it: its p's are evaluated again with the new ones, so
        # the file stays one evaluation (one checkpoint, one set of settings) and keeps the thresholds an
        # export reads for those p's
        ps = sorted(set(ps) | {r["keep_fraction"] for r in json.loads((out_dir / "eval.json").read_text())["sweep"]})
    res = evaluate_run(cfg, dims, out_dir, model, data_url, None, step=step, keep_fractions=ps)
    if res is not None:  # rank 0 (under accelerate launch every rank evaluates its part)
        print(json.dumps({k: res[k] for k in ("probe_accuracy", "best_keep_fraction", "best_accuracy")}, indent=1))
    return 0


def _keep_fractions_arg(args) -> list[float] | None:
    """--keep-fraction P / --keep-fractions P,P,... as floats in [0, 1] (None: the run's configured sweep)."""
    from s3dist.config import ConfigError

    flag, text = "--keep-fractions", getattr(args, "keep_fractions", None)
    if text is None and getattr(args, "keep_fraction", None) is not None:
        flag, text = "--keep-fraction", str(args.keep_fraction)
    if text is None:
        return None
    ps = []
    for item in text.split(","):
        try:
            p = float(item)
        except ValueError:
            p = float("nan")
        if not 0.0 <= p <= 1.0:  # also NaN and an empty item
            raise ConfigError(f"{flag} {text!r}: {item.strip()!r} is not a keep fraction; give numbers in [0, 1], "
                              f"comma-separated, e.g. 0,0.1,0.3,1.0")
        ps.append(p)
    return ps


# Keys that runs meant as seeds of one setting may differ in (where they ran, and how).
SEED_RUN_KEYS = ("seed", "name", "output_dir", "resume", "overwrite", "logging.", "checkpoint.", "dist.", "data.path",
                 "data.prefetch", "data.read_threads", "data.eval_batch_size")


def settings_that_differ(runs: list[Path]) -> dict[str, list]:
    """{dotted key: each run's value} for the config keys, other than SEED_RUN_KEYS, on which the runs'
    config.yaml disagree (a run without a readable one is left out: the comparison only feeds a warning)."""
    import yaml

    from s3dist.config import ConfigError, flatten, from_dict, to_dict

    configs = []
    for r in runs:
        try:
            cfg = from_dict(yaml.safe_load((r / "config.yaml").read_text()))
        except (OSError, yaml.YAMLError, ConfigError, TypeError):
            continue
        configs.append(flatten(to_dict(cfg)))
    keys = sorted({k for c in configs for k in c if not k.startswith(SEED_RUN_KEYS)})
    return {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}


def aggregate_seeds(runs: list[Path], out_dir: Path) -> dict:
    """Mean and std per keep fraction over several runs' eval.json (e.g. seeds): nothing is evaluated again, and
    only the keep fractions every run evaluated are kept. Warns when the runs differ in more than their seed."""
    from s3dist.data import DataError

    tables = []
    for r in runs:
        f = r / "eval.json"
        if not f.exists():
            raise DataError(f"'{f}' is missing: evaluate that run first (s3dist sweep --run {r})")
        tables.append({row["keep_fraction"]: row["accuracy"] for row in json.loads(f.read_text())["sweep"]})
    differ = settings_that_differ(runs)
    if differ:
        log.warning("these runs differ in more than their seed, so the mean is over different settings: %s",
                    "; ".join(f"{k} = {', '.join(map(repr, v))}" for k, v in differ.items()))
    common = sorted(set.intersection(*(set(t) for t in tables)))
    rows = [{"keep_fraction": p, "accuracy": statistics.mean(t[p] for t in tables),
             "std": statistics.pstdev([t[p] for t in tables]), "n": len(tables)} for p in common]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep_seeds.json").write_text(json.dumps({"runs": [str(r) for r in runs], "sweep": rows}, indent=1))
    plot_sweep({"mean over runs": rows}, out_dir / "sweep_seeds.png", std={"mean over runs": [r["std"] for r in rows]})
    return {"sweep": rows}


def _cli_sweep(args) -> int:
    # `--run A B key=value`: argparse's greedy --run list swallows the overrides; they are the items with '='
    args.overrides = list(args.overrides) + [str(r) for r in args.run if "=" in str(r)]
    args.run = [r for r in args.run if "=" not in str(r)]
    if len(args.run) > 1:
        from s3dist.config import ConfigError

        if args.keep_fractions or args.overrides:
            raise ConfigError("several runs are aggregated from their own eval.json, so --keep-fractions and "
                              "KEY=VALUE settings do not apply: sweep each run first (s3dist sweep --run RUN ...)")
        if len({r.resolve() for r in args.run}) < len(args.run):
            raise ConfigError(f"a run is given twice in --run {' '.join(map(str, args.run))}; give each once")
        res = aggregate_seeds(args.run, args.out or args.run[0].parent)
        for r in res["sweep"]:
            print(f"p={r['keep_fraction']:.2f}  acc={100 * r['accuracy']:.2f} ± {100 * r['std']:.2f}  (n={r['n']})")
        return 0
    args.run = args.run[0]
    args.model = None
    return _cli_eval(args)


def _guarded(fn):
    """Bad input (config key, checkpoint, data) exits 2 with the message, not a traceback."""
    def run(args) -> int:
        from s3dist.checkpoint import CheckpointError
        from s3dist.config import ConfigError
        from s3dist.data import DataError
        from s3dist.runlock import RunLockError

        try:
            return fn(args)
        # FileNotFoundError: a path typed wrong; RunLockError: a job is writing the run directory
        except (ConfigError, CheckpointError, DataError, RunLockError, FileNotFoundError) as e:
            print(f"s3dist {args.command}: {e}", file=sys.stderr)
            return 2
    return run


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    if name == "eval":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", type=Path, help="run directory (newest checkpoint is used)")
        src.add_argument("--model", type=Path, help="an export (s3dist export): its folder, or a .safetensors file")
        p.add_argument("--keep-fraction", type=float, help="one keep fraction p in [0, 1]")
        p.set_defaults(func=_guarded(_cli_eval))
    else:
        p.add_argument("--run", type=Path, nargs="+", required=True,
                       help="run directory; several runs (seeds) are aggregated into mean ± std")
        p.add_argument("--keep-fractions", help="comma-separated list, e.g. 0,0.1,0.3,1.0")
        p.set_defaults(func=_guarded(_cli_sweep))
    p.add_argument("--out", type=Path, help="where the outputs go: eval.json, sweep.csv/png of one run (default: "
                                            "the run directory, or the exported file's folder), or "
                                            "sweep_seeds.json/png of several (default: the first run's parent "
                                            "folder)")
    p.add_argument("--data", help="data set URL (default: the run's)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"evaluation settings, e.g. data.eval_batch_size=32 stages.prune_threshold=batch (keys "
                        f"starting with {', '.join(EVAL_OVERRIDE_PREFIXES)})")
