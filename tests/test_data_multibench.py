"""MultiBench importers against tiny fixture files in MultiBench's exact layouts, the restricted
unpickler, and import-arrays. Expectations are computed by hand from the fixture values."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from s3dist.data import DataError
from s3dist.data.arrays import import_arrays
from s3dist.data.manifest import read_manifest
from s3dist.data.multibench import import_multibench
from s3dist.data.stream import ShardStream


def read_split(url: str, split: str):
    """All rows of a split as a dict of numpy arrays, in file order."""
    m = read_manifest(url)
    tables = [pq.read_table(f"{url}/{f}") for f in m.splits[split].files]
    out = {}
    for name in tables[0].column_names:
        col = np.concatenate([np.asarray(t.column(name).to_pylist()) for t in tables])
        out[name] = col
    return out


def affect_split(labels, text_zero_rows=(), pad_front=None, audio_neginf=None, n=5, t=4, dims=(3, 2, 2)):
    """One split of an affect pickle: text / audio / vision [N, T, D], labels, id."""
    rng = np.random.default_rng(len(labels))
    dv, da, dt = dims
    split = {"vision": rng.normal(size=(n, t, dv)), "audio": rng.normal(size=(n, t, da)),
             "text": rng.normal(size=(n, t, dt)) + 5.0, "labels": np.asarray(labels, dtype=np.float32),
             "id": np.array([[f"vid{i}"] for i in range(n)])}
    for r in text_zero_rows:
        split["text"][r] = 0.0
    for r, steps in (pad_front or {}).items():
        for m in ("vision", "audio", "text"):
            split[m][r, :steps] = 0.0
    if audio_neginf:
        split["audio"][audio_neginf] = -np.inf
    return split


def write_pickle(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def test_mosi_drops_zero_text_binarises_and_masks(tmp_path):
    """MOSI: text-all-zero samples are dropped from every key, labels [N,1] become label > 0, raw labels
    are kept, audio -inf becomes 0, the mask starts at the first non-zero text step, official splits."""
    data = {
        "train": affect_split([[0.5], [-1.2], [2.0], [0.0], [-0.1]], text_zero_rows=[2], pad_front={1: 3},
                              audio_neginf=(0, 1, 0)),
        "valid": affect_split([[1.0], [-1.0], [0.2]], n=3, text_zero_rows=[0]),
        "test": affect_split([[3.0], [-3.0]], n=2),
    }
    src = write_pickle(tmp_path / "mosi_raw.pkl", data, protocol=2)  # protocol 2: bytes via _codecs
    out = str(tmp_path / "mosi")
    m = import_multibench("mosi", str(tmp_path), out)  # a folder resolves to mosi_raw.pkl
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 4, "val": 2, "test": 2}
    assert m.modalities["text"].shape == [4, 2] and m.modalities["audio"].shape == [4, 2]
    assert m.label.kind == "binary"
    tr = read_split(out, "train")
    np.testing.assert_allclose(tr["label_raw"], [0.5, -1.2, 0.0, -0.1], rtol=1e-6)
    assert tr["label"].tolist() == [1, 0, 0, 0]
    kept = [0, 1, 3, 4]
    np.testing.assert_allclose(tr["text"].reshape(4, 4, 2), data["train"]["text"][kept], rtol=1e-6)
    audio = tr["audio"].reshape(4, 4, 2)
    assert audio[0, 1, 0] == 0.0 and np.isfinite(audio).all()
    assert tr["text__mask"][1].tolist() == [False, False, False, True]  # sample 1 padded 3 steps at the front
    assert tr["vision__mask"][0].all()
    va = read_split(out, "val")
    assert va["label"].tolist() == [0, 1]  # valid[0] dropped; raw -1.0, 0.2
    assert len(set(tr["id"]) | set(va["id"]) | set(read_split(out, "test")["id"])) == 8
    assert os.path.basename(src) == "mosi_raw.pkl"


def test_mosei_label_shape_n11_and_humor_sarcasm_thresholds(tmp_path):
    """MOSEI labels of shape [N,1,1] binarise as > 0; humor / sarcasm use 'values < 1 -> class 0'."""
    def full(labels):
        n = len(labels)
        return {"train": affect_split(labels, n=n), "valid": affect_split(labels, n=n),
                "test": affect_split(labels, n=n)}

    mosei = full(np.array([[[0.3]], [[-0.3]], [[0.0]]]))
    import_multibench("mosei", write_pickle(tmp_path / "mosei_senti_data.pkl", mosei), str(tmp_path / "mosei"))
    assert read_split(str(tmp_path / "mosei"), "test")["label"].tolist() == [1, 0, 0]

    humor = full([0.0, 1.0, 1.0, 0.0])
    import_multibench("humor", write_pickle(tmp_path / "humor.pkl", humor), str(tmp_path / "humor"))
    assert read_split(str(tmp_path / "humor"), "train")["label"].tolist() == [0, 1, 1, 0]

    sarcasm = full([-1.0, 1.0, 0.5, 2.0])
    import_multibench("sarcasm", write_pickle(tmp_path / "sarcasm.pkl", sarcasm), str(tmp_path / "sarcasm"))
    assert read_split(str(tmp_path / "sarcasm"), "val")["label"].tolist() == [0, 1, 0, 1]


def test_mosi_data_dims_and_stream_roundtrip(tmp_path):
    """mosi_data (vision 20, audio 5, text 300) imports with those widths and streams as [B, T, D]."""
    data = {s: affect_split([1.0, -1.0, 2.0], n=3, t=50, dims=(20, 5, 300)) for s in ("train", "valid", "test")}
    out = str(tmp_path / "md")
    import_multibench("mosi_data", write_pickle(tmp_path / "mosi_data.pkl", data), out)
    batch = next(iter(ShardStream(out, "train", batch_size=3)))
    assert {m: tuple(x.shape) for m, x in batch.features.items()} == {
        "text": (3, 50, 300), "audio": (3, 50, 5), "vision": (3, 50, 20)}
    assert batch.labels.tolist() == [1, 0, 1]


def test_mimic_mortality_labels_normalisation_and_seeded_split(tmp_path):
    """MIMIC: inf/NaN -> 0, z-scored features, the 6-class mortality label (first positive column of
    adm_labels_all[:, 1:6]), and MultiBench's random.seed(10) shuffle into 10/10/80 splits."""
    n = 20
    rng = np.random.default_rng(0)
    ts = rng.normal(3.0, 2.0, size=(n, 24, 12))
    ts[0, 0, 0] = np.inf
    static = rng.normal(1.0, 4.0, size=(n, 5))
    static[1, 2] = np.nan
    adm = np.zeros((n, 6))
    adm[3, 3] = 1                 # -> class 3
    adm[4, 1:3] = 1               # -> class 1 (the first positive)
    adm[5, 5] = 1                 # -> class 5
    src = write_pickle(tmp_path / "im.pk", {"ep_tdata": ts, "adm_features_all": static, "adm_labels_all": adm,
                                            "y_icd9": rng.integers(0, 2, size=(n, 20))})
    out = str(tmp_path / "mimic")
    m = import_multibench("mimic", src, out)
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 16, "val": 2, "test": 2}
    assert m.label.num_classes == 6 and m.modalities["static"].shape == [5] and not m.modalities["static"].sequence
    order = list(range(n))
    random.seed(10)
    random.shuffle(order)         # what MultiBench does to its list of samples
    assert read_split(out, "val")["id"].tolist() == order[:2]
    assert read_split(out, "test")["id"].tolist() == order[2:4]
    tr = read_split(out, "train")
    assert tr["id"].tolist() == order[4:]
    rows = {s: read_split(out, s) for s in ("train", "val", "test")}
    label_of = {int(i): int(y) for r in rows.values() for i, y in zip(r["id"], r["label"])}
    assert (label_of[3], label_of[4], label_of[5], label_of[0]) == (3, 1, 5, 0)
    allstatic = np.concatenate([r["static"] for r in rows.values()])
    np.testing.assert_allclose(allstatic.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(allstatic.std(0), 1.0, atol=1e-4)
    assert all(np.isfinite(r["timeseries"]).all() for r in rows.values())

    icd = import_multibench("mimic", src, str(tmp_path / "icd"), task=7)
    assert icd.label.kind == "binary" and icd.name == "mimic_icd9_7"


def test_avmnist_folders_scaling_and_tail_validation(tmp_path):
    """AV-MNIST: image/ and audio/ .npy folders, /255 scaling, validation = the tail of train (N // 12)."""
    rng = np.random.default_rng(1)
    for part, n in (("train", 24), ("test", 6)):
        (tmp_path / "image").mkdir(exist_ok=True)
        (tmp_path / "audio").mkdir(exist_ok=True)
        np.save(tmp_path / "image" / f"{part}_data.npy", rng.integers(0, 256, size=(n, 784)).astype(np.float32))
        np.save(tmp_path / "audio" / f"{part}_data.npy", rng.integers(0, 256, size=(n, 112, 112)).astype(np.float32))
        np.save(tmp_path / f"{part}_labels.npy", np.arange(n) % 10)
    out = str(tmp_path / "av")
    m = import_multibench("avmnist", str(tmp_path), out)
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 22, "val": 2, "test": 6}
    assert m.modalities["image"].shape == [28, 28] and m.modalities["audio"].shape == [112, 112]
    va = read_split(out, "val")
    assert va["label"].tolist() == [22 % 10, 23 % 10]
    img = np.load(tmp_path / "image" / "train_data.npy")
    np.testing.assert_allclose(va["image"], img[22:] / 255.0, rtol=1e-6)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    """A pickle whose __reduce__ would create a file: the import fails naming the file and the refused
    global, the file is never created, and no output folder is left."""
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    src = write_pickle(tmp_path / "mosi_raw.pkl", {"train": {"text": Evil()}})
    with pytest.raises(DataError) as e:
        import_multibench("mosi", src, str(tmp_path / "out"))
    msg = str(e.value)
    assert "mosi_raw.pkl" in msg and "system" in msg and "refused" in msg
    assert not target.exists() and not (tmp_path / "out").exists()

    class EvalCall:
        def __reduce__(self):
            return (eval, (f"open({str(target)!r}, 'w')",))

    src = write_pickle(tmp_path / "im.pk", [EvalCall()])
    with pytest.raises(DataError, match="builtins.eval"):
        import_multibench("mimic", src, str(tmp_path / "out"))
    assert not target.exists()


def test_affect_missing_key_names_file_and_key(tmp_path):
    """A pickle without the expected split key fails with the file, the key and what was found."""
    src = write_pickle(tmp_path / "humor.pkl", {"train": affect_split([0, 1], n=2)})
    with pytest.raises(DataError, match=r"humor\.pkl.*missing key 'valid'"):
        import_multibench("humor", src, str(tmp_path / "h"))


def test_import_arrays_stratified_seeded_split(tmp_path):
    """import-arrays: [N, D] and [N, T, D] modalities, a stratified split whose sizes follow the
    fractions and keep the class balance, reproducible with the same seed, ids = original rows."""
    n = 100
    labels = np.array([0] * 60 + [1] * 40)
    np.save(tmp_path / "a.npy", np.arange(n * 3, dtype=np.float64).reshape(n, 3))
    np.save(tmp_path / "b.npy", np.ones((n, 4, 2), np.float32))
    np.save(tmp_path / "y.npy", labels)
    mods = {"a": str(tmp_path / "a.npy"), "b": str(tmp_path / "b.npy")}
    m = import_arrays(mods, str(tmp_path / "y.npy"), str(tmp_path / "ds1"), seed=3)
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 70, "val": 10, "test": 20}
    assert not m.modalities["a"].sequence and m.modalities["b"].shape == [4, 2]
    te = read_split(str(tmp_path / "ds1"), "test")
    assert te["label"].sum() == 8  # 40% of 20, stratified
    np.testing.assert_array_equal(te["a"][:, 0], te["id"] * 3)  # features travel with their row id
    import_arrays(mods, str(tmp_path / "y.npy"), str(tmp_path / "ds2"), seed=3)
    assert read_split(str(tmp_path / "ds2"), "test")["id"].tolist() == te["id"].tolist()
    ids = np.concatenate([read_split(str(tmp_path / "ds1"), s)["id"] for s in ("train", "val", "test")])
    assert sorted(ids.tolist()) == list(range(n))


def test_import_arrays_refuses_pickled_npy_and_bad_shapes(tmp_path):
    """Object (pickled) .npy files are refused (allow_pickle=False); a modality with the wrong N is named."""
    np.save(tmp_path / "y.npy", np.array([0, 1] * 10))
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy.*not a plain \.npy"):
        import_arrays({"a": str(tmp_path / "obj.npy")}, str(tmp_path / "y.npy"), str(tmp_path / "o"))
    np.save(tmp_path / "short.npy", np.zeros((19, 3)))
    with pytest.raises(DataError, match=r"modality 'a'.*short\.npy.*\[19, 3\]"):
        import_arrays({"a": str(tmp_path / "short.npy")}, str(tmp_path / "y.npy"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("labels, needle", [
    (np.zeros(20, np.int64), r"one class only \(0\)"),
    (np.array([3, 7, 100] * 7 + [3]), r"3 distinct ids up to 100.*98 ids are unused.*np\.unique"),
    (np.array([], np.int64), "holds no rows"),
])
def test_import_arrays_refuses_labels_no_task_can_use(tmp_path, labels, needle):
    """One class, ids with gaps (a class no split holds; {5, 1000000} would make a million-class head) and no
    rows are refused before anything is written, naming the labels file."""
    np.save(tmp_path / "y.npy", labels)
    np.save(tmp_path / "a.npy", np.zeros((len(labels), 3), np.float32))
    with pytest.raises(DataError, match=r"y\.npy.*" + needle):
        import_arrays({"a": str(tmp_path / "a.npy")}, str(tmp_path / "y.npy"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_import_arrays_refuses_archives_empty_dimensions_and_complex_values(tmp_path):
    np.save(tmp_path / "y.npy", np.array([0, 1] * 10))
    np.savez(tmp_path / "both.npz", a=np.zeros((20, 3)), b=np.ones((20, 3)))
    np.save(tmp_path / "empty.npy", np.zeros((20, 0, 3), np.float32))
    np.save(tmp_path / "cplx.npy", np.zeros((20, 3), np.complex64))
    for name, needle in [("both.npz", r"both\.npz is an \.npz archive of 2 arrays \(a, b\)"),
                         ("empty.npy", r"empty\.npy has shape \[20, 0, 3\].*at least 1"),
                         ("cplx.npy", r"cplx\.npy has dtype complex64; expected real numbers")]:
        with pytest.raises(DataError, match=needle):
            import_arrays({"a": str(tmp_path / name)}, str(tmp_path / "y.npy"), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_a_data_set_and_nothing_else(tmp_path, monkeypatch):
    """`--overwrite` deletes the old folder, so it takes only an s3dist data set (or an empty folder): a folder of
    the user's own files, a file, and the current directory are refused with nothing deleted."""
    np.save(tmp_path / "y.npy", np.array([0, 1] * 10))
    np.save(tmp_path / "a.npy", np.zeros((20, 3), np.float32))
    mods, y = {"a": str(tmp_path / "a.npy")}, str(tmp_path / "y.npy")
    ds = tmp_path / "ds"
    import_arrays(mods, y, str(ds))
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        import_arrays(mods, y, str(ds))
    import_arrays(mods, y, str(ds), seed=1, overwrite=True)  # a data set is replaced
    assert "seed 1" in read_manifest(str(ds)).source
    (tmp_path / "empty").mkdir()
    import_arrays(mods, y, str(tmp_path / "empty"), overwrite=True)
    assert read_manifest(str(tmp_path / "empty")).splits["train"].rows == 14

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("code")
    with pytest.raises(DataError, match=r"project' exists and is not an s3dist data set.*nothing was deleted"):
        import_arrays(mods, y, str(project), overwrite=True)
    assert (project / "src" / "main.py").read_text() == "code"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is a file, not a data-set folder"):
        import_arrays(mods, y, str(tmp_path / "notes.txt"), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(ds)
    with pytest.raises(DataError, match="is the current directory"):
        import_arrays(mods, y, ".", overwrite=True)
    assert read_manifest(str(ds)).splits["train"].rows == 14
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
