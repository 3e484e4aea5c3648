"""Importers for the original MultiBench files (the layouts are listed below), reproducing what
MultiBench's own loaders do, and the restricted unpickler that reads their pickles without running code.

Per benchmark (MultiBench source: datasets/affect/get_data.py, datasets/mimic/get_data.py,
datasets/avmnist/get_data.py):

- affect (mosi, mosi_data, mosei, humor, sarcasm): a pickled dict train / valid / test -> {vision, audio,
  text, labels, id}. Samples whose text sums to zero are dropped (`drop_entry`); audio -inf -> 0. MultiBench
  trims each sample to start at the first time step where text is non-zero (`aligned=True`); we keep the
  fixed [T, D] arrays and store that as the mask (True from that step on, for all three modalities).
  Labels: mosi / mosi_data / mosei: class 1 if label > 0 else 0; humor / sarcasm: class 0 if label < 1
  else 1 (MultiBench uses the raw 0/1 humor label and `> 0` for sarcasm: identical on their 0/1 and
  -1/1 label sets). The raw label is kept in `label_raw`.
- mimic (im.pk): non-finite values -> 0, z-scored per feature over the whole file (static features over
  samples, time series over samples and steps; a zero std is taken as 1, where MultiBench would produce
  NaN). Task -1 (default): the 6-class mortality label (first of adm_labels_all[:, 1..5] that is > 0,
  else 0); task 0..19: binary ICD-9 group y_icd9[:, task]. Python's `random.seed(10); random.shuffle`
  then valid = first N//10, test = next N//10 .. N//5, train = the rest.
- avmnist: image/{train,test}_data.npy ([N, 784] or [N, 28, 28]) and audio/{train,test}_data.npy
  ([N, 112, 112]), labels {train,test}_labels.npy in the folder root (or image/). Both scaled by 1/255.
  Image stored as a 28-step sequence of 28-wide rows, audio as 112 steps of 112. Valid = the tail
  of train (5000 of 60000, i.e. N // 12 rows), train = the rest, test = test.
"""

from __future__ import annotations

import os
import pickle
import random

import fsspec
import numpy as np

from s3dist.data import DataError
from s3dist.data.manifest import LabelSpec, Manifest, dataset_fs
from s3dist.data.writer import SplitArrays, write_dataset

AFFECT = ("mosi", "mosi_data", "mosei", "humor", "sarcasm")
BENCHMARKS = AFFECT + ("mimic", "avmnist")
# File names MultiBench distributes, tried in order when --source is a folder.
DEFAULT_FILES = {"mosi": ("mosi_raw.pkl",), "mosi_data": ("mosi_data.pkl",),
                 "mosei": ("mosei_senti_data.pkl", "mosei_raw.pkl"), "humor": ("humor.pkl",),
                 "sarcasm": ("sarcasm.pkl",), "mimic": ("im.pk",)}
_SPLITS = (("train", "train"), ("valid", "val"), ("test", "test"))

# ----------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------

# Everything a MultiBench pickle needs: containers and scalars, numpy arrays / dtypes / scalars.
_ALLOWED_GLOBALS = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                              "bytes", "bytearray", "bool", "slice", "range")
} | {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),                    # how protocol-2 pickles spell bytes (latin-1 strings)
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals MultiBench pickles contain; anything else is refused
    before it can be called, so loading never runs code from the file."""

    def __init__(self, file, *, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            if module.startswith("numpy.core"):  # numpy 1.x pickles; numpy 2 moved these to numpy._core
                module = "numpy._core" + module[len("numpy.core"):]
            return super().find_class(module, name)
        raise DataError(f"{self._source}: refused to load global '{module}.{name}'; MultiBench pickles hold only "
                        f"dicts, lists, numpy arrays and scalars, so this file is not one (it may try to run "
                        f"code). Check where it came from")


def load_pickle(url: str):
    """Load a pickle through `RestrictedUnpickler`, with errors naming the file."""
    try:
        with fsspec.open(url, "rb") as f:
            return RestrictedUnpickler(f, source=url).load()
    except FileNotFoundError as e:
        raise DataError(f"{url} not found; download it from MultiBench and pass its path as --source") from e
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
        raise DataError(f"{url} is not a readable pickle ({type(e).__name__}: {e}); re-download it") from e


def _need(d, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        have = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{where}: missing key '{key}' (found {have}); is this the right MultiBench file for "
                        f"the chosen --benchmark?")
    return d[key]


# ----------------------------------------------------------------------------------------------
# Affect: MOSI, MOSEI, UR-FUNNY (humor), MUStARD (sarcasm)
# ----------------------------------------------------------------------------------------------


def affect_binarize(benchmark: str, raw: np.ndarray) -> np.ndarray:
    if benchmark in ("humor", "sarcasm"):
        return (raw >= 1).astype(np.int64)
    return (raw > 0).astype(np.int64)


def _affect_split(benchmark: str, d: dict, where: str) -> SplitArrays:
    arrays = {m: np.asarray(_need(d, m, where), dtype=np.float64) for m in ("text", "audio", "vision")}
    raw = np.asarray(_need(d, "labels", where), dtype=np.float64)
    n = arrays["text"].shape[0]
    for m, a in arrays.items():
        if a.ndim != 3 or a.shape[0] != n:
            raise DataError(f"{where}: '{m}' has shape {list(a.shape)}; expected [N, T, D] with N = {n} "
                            f"(the number of text samples)")
    if raw.shape[0] != n or raw.size != n:
        raise DataError(f"{where}: 'labels' has shape {list(raw.shape)}; expected {n} values ([N], [N, 1] or "
                        f"[N, 1, 1])")
    raw = raw.reshape(n)
    keep = arrays["text"].reshape(n, -1).sum(1) != 0          # MultiBench drop_entry: k.sum() == 0
    arrays = {m: a[keep] for m, a in arrays.items()}
    raw = raw[keep]
    arrays["audio"][arrays["audio"] == -np.inf] = 0.0
    nonzero = arrays["text"].any(axis=2)                      # [N, T]: steps with any non-zero text
    first = np.where(nonzero.any(1), nonzero.argmax(1), arrays["text"].shape[1])
    steps = np.arange(arrays["text"].shape[1])[None, :]
    masks = {}
    for m, a in arrays.items():
        if a.shape[1] != arrays["text"].shape[1]:
            raise DataError(f"{where}: '{m}' has {a.shape[1]} steps, text has {arrays['text'].shape[1]}; MultiBench "
                            f"affect data is aligned (same steps in every modality)")
        masks[m] = steps >= first[:, None]
    return SplitArrays(features={m: a.astype(np.float32) for m, a in arrays.items()},
                       labels=affect_binarize(benchmark, raw), label_raw=raw, masks=masks)


def _import_affect(benchmark: str, source: str) -> tuple[dict[str, SplitArrays], LabelSpec]:
    data = load_pickle(source)
    splits = {new: _affect_split(benchmark, _need(data, old, source), f"{source} ['{old}']") for old, new in _SPLITS}
    rule = "label_raw >= 1 -> 1, else 0" if benchmark in ("humor", "sarcasm") else "label_raw > 0 -> 1, else 0"
    return splits, LabelSpec(kind="binary", num_classes=2, binarize=rule)


# ----------------------------------------------------------------------------------------------
# MIMIC
# ----------------------------------------------------------------------------------------------


def mimic_split_indices(n: int) -> dict[str, list[int]]:
    """MultiBench's split: random.seed(10); random.shuffle(samples); valid / test / train slices."""
    order = list(range(n))
    random.Random(10).shuffle(order)  # the same permutation as random.seed(10); random.shuffle(order)
    return {"train": order[n // 5:], "val": order[: n // 10], "test": order[n // 10: n // 5]}


def _import_mimic(source: str, task: int) -> tuple[dict[str, SplitArrays], LabelSpec]:
    data = load_pickle(source)
    xt = np.array(_need(data, "ep_tdata", source), dtype=np.float64)
    xs = np.array(_need(data, "adm_features_all", source), dtype=np.float64)
    n = xt.shape[0]
    if xt.ndim != 3 or xs.ndim != 2 or xs.shape[0] != n:
        raise DataError(f"{source}: 'ep_tdata' {list(xt.shape)} / 'adm_features_all' {list(xs.shape)} must be "
                        f"[N, T, D] / [N, D] with the same N")
    for x in (xt, xs):
        x[~np.isfinite(x)] = 0.0
    s_std, t_std = xs.std(0), xt.std((0, 1))
    xs = (xs - xs.mean(0)) / np.where(s_std == 0, 1.0, s_std)
    xt = (xt - xt.mean((0, 1))) / np.where(t_std == 0, 1.0, t_std)
    if task < 0:
        adm = np.asarray(_need(data, "adm_labels_all", source))
        if adm.ndim != 2 or adm.shape[0] != n or adm.shape[1] < 6:
            raise DataError(f"{source}: 'adm_labels_all' has shape {list(adm.shape)}; expected [{n}, >=6]")
        positive = adm[:, 1:6] > 0
        y = np.where(positive.any(1), positive.argmax(1) + 1, 0).astype(np.int64)
        label = LabelSpec(kind="multiclass", num_classes=6,
                          binarize="mortality: first k in 1..5 with adm_labels_all[:, k] > 0, else 0")
    else:
        icd = np.asarray(_need(data, "y_icd9", source))
        if icd.ndim != 2 or icd.shape[0] != n or not 0 <= task < icd.shape[1]:
            raise DataError(f"{source}: 'y_icd9' has shape {list(icd.shape)}; task {task} needs column {task}")
        y = icd[:, task].astype(np.int64)
        label = LabelSpec(kind="binary", num_classes=2, binarize=f"y_icd9[:, {task}] (ICD-9 group {task})")
    splits = {}
    for s, idx in mimic_split_indices(n).items():
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            raise DataError(f"{source}: {n} samples leave split '{s}' empty (MIMIC splits 80/10/10)")
        splits[s] = SplitArrays(features={"static": xs[idx].astype(np.float32), "timeseries": xt[idx].astype(np.float32)},
                                labels=y[idx], ids=idx)
    return splits, label


# ----------------------------------------------------------------------------------------------
# AV-MNIST
# ----------------------------------------------------------------------------------------------


def _load_npy(url: str) -> np.ndarray:
    try:
        with fsspec.open(url, "rb") as f:
            return np.load(f, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{url} not found; --source must be the AV-MNIST folder (image/, audio/, labels)") from e
    except ValueError as e:
        raise DataError(f"{url} is not a plain .npy array ({e})") from e


def _import_avmnist(source: str) -> tuple[dict[str, SplitArrays], LabelSpec]:
    fs, root = dataset_fs(source)
    root = root.rstrip("/")
    arrays = {}
    for part in ("train", "test"):
        img = _load_npy(fs.unstrip_protocol(f"{root}/image/{part}_data.npy")).astype(np.float32) / 255.0
        aud = _load_npy(fs.unstrip_protocol(f"{root}/audio/{part}_data.npy")).astype(np.float32) / 255.0
        lab_path = f"{root}/{part}_labels.npy"
        if not fs.exists(lab_path):
            lab_path = f"{root}/image/{part}_labels.npy"
        lab = _load_npy(fs.unstrip_protocol(lab_path)).astype(np.int64).reshape(-1)
        n = img.shape[0]
        if img.reshape(n, -1).shape[1] != 784 or aud.shape[0] != n or aud.reshape(n, -1).shape[1] != 112 * 112 \
                or lab.shape[0] != n:
            raise DataError(f"{source}: {part} arrays have shapes image {list(img.shape)}, audio {list(aud.shape)}, "
                            f"labels {list(lab.shape)}; expected [N, 784] (or [N, 28, 28]), [N, 112, 112], [N]")
        arrays[part] = (img.reshape(n, 28, 28), aud.reshape(n, 112, 112), lab)
    img, aud, lab = arrays["train"]
    n_val = img.shape[0] // 12                               # 5000 of 60000, as MultiBench
    cut = img.shape[0] - n_val
    parts = {"train": (img[:cut], aud[:cut], lab[:cut]), "val": (img[cut:], aud[cut:], lab[cut:]),
             "test": arrays["test"]}
    splits = {s: SplitArrays(features={"image": a, "audio": b}, labels=y) for s, (a, b, y) in parts.items()}
    return splits, LabelSpec(kind="multiclass", num_classes=10, binarize="digit class 0..9 as stored")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def resolve_source(benchmark: str, source: str) -> str:
    """A folder given for a single-file benchmark resolves to MultiBench's file name inside it."""
    if benchmark == "avmnist":
        return source
    fs, path = dataset_fs(source)
    if fs.isdir(path):
        for name in DEFAULT_FILES[benchmark]:
            if fs.exists(f"{path.rstrip('/')}/{name}"):
                return f"{source.rstrip('/')}/{name}"
        raise DataError(f"{source} is a folder without {' or '.join(DEFAULT_FILES[benchmark])}; pass the file itself")
    return source


def import_multibench(benchmark: str, source: str, out_url: str, *, task: int = -1, rows_per_shard: int = 1024,
                      overwrite: bool = False) -> Manifest:
    """Import one MultiBench benchmark from `source` into a data set at `out_url`."""
    if benchmark not in BENCHMARKS:
        raise DataError(f"unknown benchmark {benchmark!r}; choose one of {list(BENCHMARKS)}")
    source = resolve_source(benchmark, source)
    if benchmark in AFFECT:
        splits, label = _import_affect(benchmark, source)
    elif benchmark == "mimic":
        splits, label = _import_mimic(source, task)
    else:
        splits, label = _import_avmnist(source)
    name = benchmark if benchmark != "mimic" or task < 0 else f"mimic_icd9_{task}"
    return write_dataset(out_url, name=name, splits=splits, label=label, rows_per_shard=rows_per_shard,
                         source=f"MultiBench {benchmark} imported from {os.path.basename(source.rstrip('/'))}",
                         overwrite=overwrite)
