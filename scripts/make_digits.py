"""A small real multi-view data set that needs no download: scikit-learn's handwritten digits as two views.

`load_digits()` ships inside scikit-learn (1797 images of 8x8 pixels, 10 classes). Each image is cut
into its top half (rows 0-3) and its bottom half (rows 4-7); each half is a short sequence of 4 "time
steps" (image rows) of 8 features (pixels), scaled from 0..16 to [0, 1]. Neither half alone shows the
whole digit, so the two views carry both shared and view-specific information about the class.

    .venv/bin/python scripts/make_digits.py --out data/digits-arrays
    s3dist data import-arrays --modality top=data/digits-arrays/top.npy \\
        --modality bottom=data/digits-arrays/bottom.npy --labels data/digits-arrays/labels.npy --out data/digits

Writes DIR/top.npy and DIR/bottom.npy (float32 [N, 4, 8]) and DIR/labels.npy (int64 [N], 0..9).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def digit_views() -> dict[str, np.ndarray]:
    """{"top": [N, 4, 8], "bottom": [N, 4, 8]} float32 in [0, 1] and "labels": [N] int64."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)          # [N, 8, 8], pixel values 0..16
    return {"top": images[:, :4, :], "bottom": images[:, 4:, :], "labels": digits.target.astype(np.int64)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write top.npy, bottom.npy and labels.npy into")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    views = digit_views()
    for name, array in views.items():
        np.save(out / f"{name}.npy", np.ascontiguousarray(array))
    print(f"wrote {out}/top.npy, bottom.npy, labels.npy ({len(views['labels'])} samples); import with: s3dist data "
          f"import-arrays --modality top={out}/top.npy --modality bottom={out}/bottom.npy "
          f"--labels {out}/labels.npy --out data/digits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
