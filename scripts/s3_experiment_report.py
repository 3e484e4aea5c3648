"""Tables and plots of `scripts/s3_experiment.sh`'s results, as they appear in README "Reproducing S3".

    .venv/bin/python scripts/s3_experiment_report.py runs/s3-exp [--plots docs]

Reads every `<OUT>/<data>/<method>-s<seed>[-<variant>]/eval.json`, prints markdown tables (test accuracy
mean ± population std over seeds per keep fraction p; the accuracy at the p chosen on validation; expert /
factor mutual information by factor group) and writes one sweep plot per data set.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ["s3-chi2", "s3-chi8", "moe", "dense", "clip", "s3-no-selection", "s3-expert-output", "s3-entropy",
         "s3-stem", "s3-chi2-sample-pairs", "s3-chi2-batch-rule", "s3-chi2-last-layer"]
LABELS = {
    "s3-chi2": "S3, chi=2 (N=4, k=2)", "s3-chi8": "S3, chi=8 (N=16, k=8)", "moe": "plain MoE (Stage 1 only)",
    "dense": "dense contrastive (Stage 1 only)", "clip": "dense CLIP-style (cross-modal InfoNCE only)",
    "s3-no-selection": "S3 without Selection (Stages 1+3)", "s3-expert-output": "S3, representation = expert output",
    "s3-entropy": "S3, entropy compactness (not vMF)", "s3-stem": "S3, conv stem, no attention",
    "s3-chi2-sample-pairs": "S3, prune (sample, expert) pairs", "s3-chi2-batch-rule": "S3, per-batch threshold",
    "s3-chi2-last-layer": "S3, prune last layer only",
}
DATA = {"factors": "synthetic v2: label needs shared + unique factors",
        "shared": "synthetic v2 control: label from shared factors only", "digits": "digits, top / bottom halves"}


def load(out: Path) -> dict:
    """{data: {method: [eval.json of each seed]}}"""
    runs: dict = defaultdict(lambda: defaultdict(list))
    for f in sorted(out.glob("*/*/eval.json")):
        m = re.fullmatch(r"(.+)-s(\d+)(-.+)?", f.parent.name)
        if not m:
            continue
        method = m.group(1) + (m.group(3) or "")
        runs[f.parent.parent.name][method].append(json.loads(f.read_text()))
    return runs


def _ms(xs: list[float]) -> str:
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.pstdev(xs):.2f}"


def raw_input_probe(out: Path, data: str) -> dict[str, list[float]]:
    """References: the same probe on the raw inputs of each seed's data set, time-averaged over the real
    steps and with every step flattened (how much of the label a linear read-out of the inputs finds)."""
    import numpy as np

    from s3dist.data.stream import ShardStream
    from s3dist.evaluate import fit_probe

    by_seed = {}  # every run of a seed generated the same synthetic data set: one per seed
    for d in sorted(out.glob(f"{data}/*-s*/data")):
        seed = re.fullmatch(r".+-s(\d+)(-.+)?", d.parent.name)
        if seed and (d / "manifest.json").exists():
            by_seed.setdefault(seed.group(1), str(d))
    urls = list(by_seed.values())
    if data == "digits" and (out / "data" / "digits" / "manifest.json").exists():
        urls = [str(out / "data" / "digits")]
    accs: dict[str, list[float]] = {"time-averaged": [], "all steps": []}
    for url in urls:
        xy: dict = {k: {} for k in accs}
        for split in ("train", "val", "test"):
            feats: dict = {k: [] for k in accs}
            labels = []
            for b in ShardStream(url, split, batch_size=512, shuffle_buffer=0, drop_last=False, prefetch=0):
                m = {k: v.unsqueeze(-1).float() for k, v in b.masks.items()}
                mods = sorted(b.features)
                feats["time-averaged"].append(np.concatenate(
                    [((b.features[k] * m[k]).sum(1) / m[k].sum(1).clamp_min(1)).numpy() for k in mods], axis=1))
                feats["all steps"].append(np.concatenate([(b.features[k] * m[k]).flatten(1).numpy() for k in mods],
                                                         axis=1))
                labels.append(b.labels.numpy())
            for k in accs:
                xy[k][split] = (np.concatenate(feats[k]), np.concatenate(labels))
        for k in accs:
            r = fit_probe(*xy[k]["train"], *xy[k]["val"], *xy[k]["test"], [0.01, 0.1, 1.0, 10.0], 2000)
            accs[k].append(r["accuracy"])
    return accs


def sweep_table(runs: dict, raw: dict[str, list[float]] | None = None) -> str:
    ps = sorted({r["keep_fraction"] for per in runs.values() for evs in per.values() for e in evs
                 for r in e["sweep"]})
    head = "| data | method | n | " + " | ".join(f"p={p:g}" for p in ps) + " | p chosen on val |"
    lines = [head, "|" + "---|" * (len(ps) + 4)]
    for data in DATA:
        for method in [m for m in ORDER if m in runs.get(data, {})]:
            evs = runs[data][method]
            cells = []
            for p in ps:
                accs = [r["accuracy"] for e in evs for r in e["sweep"] if r["keep_fraction"] == p]
                cells.append(_ms(accs) if len(accs) == len(evs) else "")
            chosen = _ms([e["best_accuracy"] for e in evs])
            lines.append(f"| {data} | {LABELS.get(method, method)} | {len(evs)} | " + " | ".join(cells) + f" | {chosen} |")
        for kind, accs in (raw or {}).get(data, {}).items():
            if accs:
                lines.append(f"| {data} | linear probe on the raw inputs ({kind}) | {len(accs)} | "
                             + " | ".join("" for _ in ps) + f" | {_ms(accs)} |")
    return "\n".join(lines)


def mi_table(runs: dict) -> str:
    lines = ["| data | method | shared | unique (own) | nuisance (own) | label factors | all |", "|---|---|---|---|---|---|---|"]
    for data in ("factors", "shared"):
        # evaluation-only variants (s3-chi2-<variant>) share the s3-chi2 models: same routers, same MI
        for method in [m for m in ORDER if m in runs.get(data, {}) and "specialization" in runs[data][m][0]
                       and not m.startswith("s3-chi2-")]:
            evs = runs[data][method]
            cells = []
            for group in ("shared", "unique", "nuisance", "label", "all"):
                trained, rand = [], []
                for e in evs:
                    spec = e["specialization"]
                    trained.append(statistics.mean(s["mi_by_group"][group] for s in spec.values()))
                    rand.append(statistics.mean(s["mi_random_router_by_group"][group] for s in spec.values()))
                cells.append(f"{statistics.mean(trained):.4f} vs {statistics.mean(rand):.4f}")
            lines.append(f"| {data} | {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for data, per in runs.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for method in [m for m in ORDER if m in per]:
            evs = per[method]
            ps = sorted({r["keep_fraction"] for e in evs for r in e["sweep"]})
            means = [100 * statistics.mean(r["accuracy"] for e in evs for r in e["sweep"] if r["keep_fraction"] == p)
                     for p in ps]
            if len(ps) == 1:
                ax.axhline(means[0], linestyle="--", linewidth=1, label=LABELS.get(method, method),
                           color=f"C{ORDER.index(method) % 10}")
            elif not method.startswith("s3-chi2-") and method not in ("s3-stem",):
                ax.plot(ps, means, marker="o", label=LABELS.get(method, method), color=f"C{ORDER.index(method) % 10}")
        ax.set_xlabel("kept fraction p of routing units (token, expert pairs)")
        ax.set_ylabel("linear-probe test accuracy (%), mean of seeds")
        ax.set_title(DATA.get(data, data), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"s3_sweep_{data}.png")
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--plots", type=Path, help="write s3_sweep_<data>.png here")
    ap.add_argument("--raw", action="store_true", help="add the raw-input probe reference rows")
    args = ap.parse_args()
    runs = load(args.out)
    raw = {data: raw_input_probe(args.out, data) for data in runs} if args.raw else None
    print(sweep_table(runs, raw))
    print()
    print(mi_table(runs))
    dropped = [e.get("eval_dropped_fraction", 0.0) for per in runs.values() for evs in per.values() for e in evs]
    print(f"\nevaluation dropped fraction: max {max(dropped, default=0.0):.4g} over {len(dropped)} evaluations")
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        plot(runs, args.plots)


if __name__ == "__main__":
    main()
