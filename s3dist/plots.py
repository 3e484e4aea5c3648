"""The evaluation's figures (matplotlib, Agg): the sparsity sweep's accuracy curve and the routing heatmaps.

Each function saves or returns an RGB array, so the same figure goes to a PNG file and to the trackers
(`s3dist.metrics`) without a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def class_heatmap(scores: np.ndarray, labels: np.ndarray, what: str) -> np.ndarray:
    classes = np.unique(labels)
    mat = np.stack([scores[labels == c].mean(0) for c in classes])
    return _draw(mat, [f"{what} {c}" for c in classes])


def concept_heatmap(scores: np.ndarray, concepts: np.ndarray) -> np.ndarray:
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
