"""Render the README's expert-load picture from a run's TensorBoard event files.

    .venv/bin/python docs/plot_expert_load.py RUN_DIR docs/expert_load.png

Reads the `expert_load/{modality}/layer{L}/expert{E}` and `expert_balance/.../max_over_mean`
scalars back from RUN_DIR/tb (what TensorBoard shows) and draws one panel per modality and layer:
the share of routed token-slots per expert, stacked (it sums to 1), with max/mean load on top.

The images in docs/ come from a real 2-process run (ep_size=2):

    accelerate launch --config_file launch_configs/cpu_2proc.yaml -m s3dist.train --output_dir RUN_DIR \
        stages.specialize_steps=100 stages.select_steps=40 logging.every_steps=5 eval.run_at_end=false

and `docs/tensorboard_expert_load.png` is TensorBoard itself, screenshotted headless (Debian chromium):

    tensorboard --logdir RUN_DIR/tb --host 127.0.0.1 --port 6177 &
    chromium --headless=new --no-sandbox --window-size=1400,900 --virtual-time-budget=20000 \
        --screenshot=shot.png "http://127.0.0.1:6177/#scalars&tagFilter=expert_load%2Ftext%2Flayer0&_smoothingWeight=0"
    (then cropped to 1070x770)
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

LOAD = re.compile(r"expert_load/(?P<m>[^/]+)/layer(?P<l>\d+)/expert(?P<e>\d+)$")


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def stage_spans(run_dir: Path) -> list[tuple[str, int, int]]:
    """(stage, first step, last step) from metrics.jsonl, for shading."""
    spans: dict[str, list[int]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if any(k.startswith("expert_load/") for k in row):
            spans.setdefault(row["stage"], []).append(row["step"])
    return [(s, min(v), max(v)) for s, v in spans.items()]


def main(run_dir: str, out: str) -> None:
    run = Path(run_dir)
    scalars = read_scalars(run / "tb")
    panels: dict[tuple[str, int], dict[int, list[tuple[int, float]]]] = defaultdict(dict)
    for tag, points in scalars.items():
        if m := LOAD.match(tag):
            panels[(m["m"], int(m["l"]))][int(m["e"])] = points
    if not panels:
        raise SystemExit(f"no expert_load/* scalars in {run / 'tb'}")
    keys = sorted(panels, key=lambda k: (k[1], k[0]))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (mod, layer) in zip(axes[0], keys):
        experts = panels[(mod, layer)]
        steps = [s for s, _ in experts[0]]
        shares = [[v for _, v in experts[e]] for e in sorted(experts)]
        ax.stackplot(steps, shares, labels=[f"expert{e}" for e in sorted(experts)],
                     colors=colors[:len(experts)], alpha=0.85)
        ax.axhline(1 / len(experts), color="white", lw=0.8, ls=":")
        for i, (stage, lo, hi) in enumerate(stage_spans(run)):
            ax.axvline(lo, color="black", lw=0.8, ls="--")
            ax.text(lo, 1.02, f" {stage}", fontsize=8, va="bottom", transform=ax.get_xaxis_transform())
        twin = ax.twinx()
        mom = scalars.get(f"expert_balance/{mod}/layer{layer}/max_over_mean", [])
        twin.plot([s for s, _ in mom], [v for _, v in mom], color="black", lw=1.6, label="max/mean load")
        twin.set_ylim(1.0, max([v for _, v in mom] + [2.0]) * 1.05)
        twin.tick_params(labelsize=8)
        if ax is axes[0][-1]:
            twin.set_ylabel("max / mean load", fontsize=9)
        ax.set_title(f"expert_load/{mod}/layer{layer}/*", fontsize=10, pad=16)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.set_xlim(steps[0], steps[-1])
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=8)
    axes[0][0].set_ylabel("share of routed token-slots", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    line = plt.Line2D([], [], color="black", lw=1.6)
    fig.legend(handles + [line], labels + ["max/mean load (right axis)"], loc="lower center",
               ncol=len(labels) + 1, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
