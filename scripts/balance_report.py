"""The balancing table of `scripts/balance_experiment.sh` (BENCHMARKS.md "Balancing and drops"), as markdown.

    .venv/bin/python scripts/balance_report.py runs/balance [--json table.json]

Reads `<OUT>/<variant>-s<seed>/{metrics.jsonl,eval.json}`. Per run:
* max/mean expert load and dropped fraction: the trainer's `expert_balance/<modality>/layer<L>/max_over_mean`
  and `.../dropped_fraction` (metrics.jsonl, one record per log interval: the load summed over the interval's
  steps and all ranks, before capacity), averaged over modalities and layers, then over the stage's intervals;
  Stage 1 (where moe.balance acts) and Stage 2 (routers only; bias frozen, no balance loss) separately, and
  Stage 1's last interval (the load balancing has reached);
* probe accuracy on test at p = 1 (`probe_accuracy`: no Stage-3 pruning) and at the keep fraction chosen on
  validation (`best_accuracy`, `best_keep_fraction`);
* samples/s: Stage 1's `samples_per_s` (global, all ranks; wall time of the log interval, checkpoint writes
  included), mean over intervals after the first (warm-up).
Cells are mean ± population std over seeds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ["aux_loss", "bias", "none", "dropless"]
LABELS = {"aux_loss": "aux_loss (default)", "bias": "bias (aux-loss-free)", "none": "none",
          "dropless": "aux_loss, dropless"}
COLUMNS = [("s1_max_mean", "max/mean load, Stage 1", 2), ("s1_end_max_mean", "max/mean, end of Stage 1", 2),
           ("s2_max_mean", "max/mean, Stage 2", 2), ("s1_dropped", "dropped %, Stage 1", 2),
           ("s2_dropped", "dropped %, Stage 2", 2), ("acc_p1", "probe acc. % (test, p=1)", 2),
           ("acc_best", "probe acc. % (test, p chosen on val)", 2), ("samples_s", "samples/s, Stage 1", 0)]
PERCENT = {"s1_dropped", "s2_dropped", "acc_p1", "acc_best"}


def _balance(record: dict, stat: str) -> float:
    vals = [v for k, v in record.items() if k.startswith("expert_balance/") and k.endswith("/" + stat)]
    return statistics.mean(vals) if vals else float("nan")


def run_summary(run: Path) -> dict:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    s1 = [r for r in rows if r["stage"] == "specialize"]
    s2 = [r for r in rows if r["stage"] == "select"]
    ev = json.loads((run / "eval.json").read_text())

    def mean(recs, stat):
        return statistics.mean(_balance(r, stat) for r in recs) if recs else float("nan")

    return {"s1_max_mean": mean(s1, "max_over_mean"), "s1_end_max_mean": _balance(s1[-1], "max_over_mean"),
            "s2_max_mean": mean(s2, "max_over_mean"), "s1_dropped": mean(s1, "dropped_fraction"),
            "s2_dropped": mean(s2, "dropped_fraction"), "acc_p1": ev["probe_accuracy"],
            "acc_best": ev["best_accuracy"], "best_p": ev["best_keep_fraction"],
            "samples_s": statistics.mean(r["samples_per_s"] for r in s1[1:]) if len(s1) > 1 else float("nan")}


def load(out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(out.glob("*-s*/eval.json")):
        m = re.fullmatch(r"(.+)-s(\d+)", f.parent.name)
        if m:
            runs[m.group(1)].append({"seed": int(m.group(2)), **run_summary(f.parent)})
    return runs


def _cell(xs: list[float], key: str, digits: int) -> str:
    scale = 100 if key in PERCENT else 1
    xs = [scale * x for x in xs]
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.pstdev(xs):.{digits}f}"


def table(runs: dict[str, list[dict]]) -> str:
    head = "| balancing | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for v in [v for v in ORDER if v in runs] + sorted(set(runs) - set(ORDER)):
        rs = runs[v]
        cells = [_cell([r[k] for r in rs], k, d) for k, _, d in COLUMNS]
        lines.append(f"| {LABELS.get(v, v)} | {len(rs)} | " + " | ".join(cells) + " |")
    ps = {v: sorted(r["best_p"] for r in rs) for v, rs in runs.items()}
    lines.append("")
    lines.append("p chosen on validation, per seed: " + "; ".join(f"{v} {ps[v]}" for v in ps))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--json", type=Path, help="also write the per-run numbers here")
    args = ap.parse_args()
    runs = load(args.out)
    if not runs:
        raise SystemExit(f"no <variant>-s<seed>/eval.json under {args.out}")
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
