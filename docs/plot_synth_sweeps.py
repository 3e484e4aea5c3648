"""Draw several seed-aggregated sparsity sweeps in one picture (the README's synthetic-experiment figure).

    .venv/bin/python docs/plot_synth_sweeps.py OUT.png "LABEL=RUN_GROUP/sweep_seeds.json" ...

Each argument is a `s3dist sweep --run s0 s1 s2 --out RUN_GROUP` result; the curves are mean ± std over
its seeds, with the p = 1.0 value dashed. The README's figure:

    .venv/bin/python docs/plot_synth_sweeps.py docs/synth_sweep_selection.png \
        "Stage 1 only=runs/synth-exp-noselect/s3/sweep_seeds.json" \
        "Stage 1 + Selection (S3)=runs/synth-exp-v2/s3/sweep_seeds.json" \
        "Selection, SupCon on concepts=runs/synth-exp-selconcepts/s3/sweep_seeds.json"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from s3dist.plots import plot_sweep


def main(out: str, specs: list[str]) -> None:
    curves, std = {}, {}
    for spec in specs:
        label, _, path = spec.partition("=")
        rows = json.loads(Path(path).read_text())["sweep"]
        curves[label], std[label] = rows, [r["std"] for r in rows]
    plot_sweep(curves, Path(out), std=std)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
