"""The synthetic generator's `kind=factors` (shared / unique / nuisance factors, 8-class label), the
unchanged default `kind=concepts`, the optional manifest fields that name the factors, and the digits
script + `data import-arrays` path. Single process, small sample counts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from s3dist.cli import main
from s3dist.config import ConfigError, SynthConfig
from s3dist.data.cli import synth_config
from s3dist.data.manifest import Manifest, read_manifest
from s3dist.data.synth import factor_groups, factor_layout, generate, sample_arrays

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=64, num_val=16, num_test=16, seq_len=6)


def _factors(**kw) -> SynthConfig:
    return SynthConfig(kind="factors", **{**SMALL, **kw})


def _equal(a: dict, b: dict) -> bool:
    return (all(np.array_equal(a[k], b[k]) for k in ("mask", "concepts", "labels"))
            and a["features"].keys() == b["features"].keys()
            and all(np.array_equal(a["features"][m], b["features"][m]) for m in a["features"]))


# ----------------------------------------------------------------------------------------------
# Determinism and the unchanged default
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["concepts", "factors"])
def test_same_config_same_arrays_other_seed_other_arrays(kind):
    """Both kinds are a pure function of the config: the same config gives identical arrays, another
    seed gives other ones."""
    cfg = SynthConfig(kind=kind, **SMALL)
    assert _equal(sample_arrays(cfg), sample_arrays(replace(cfg)))
    assert not _equal(sample_arrays(cfg), sample_arrays(replace(cfg, seed=1)))


def test_default_kind_is_concepts_and_its_data_is_unchanged(tmp_path):
    """The default stays kind=concepts and produces what the generator produced before kind existed:
    the integer arrays hash to the value recorded from that generator (commit ea60cb1) and the feature
    sums match it; its manifest gains no factor fields."""
    cfg = SynthConfig(**SMALL)
    assert cfg.kind == "concepts"
    data = sample_arrays(cfg)
    assert _equal(data, sample_arrays(replace(cfg, kind="concepts")))
    h = hashlib.sha256()
    for k in ("mask", "concepts", "labels"):
        h.update(np.ascontiguousarray(data[k]).tobytes())
    assert h.hexdigest() == "be7972d9b7279d9145ede522db2f9c9ef82c46e31f7601fb13c1ca4b783f37a7"
    sums = {m: float(x.astype(np.float64).sum()) for m, x in data["features"].items()}
    assert sums == pytest.approx({"text": 571.4244216179941, "audio": -1334.2376593835652,
                                  "vision": -196.51033000920143}, rel=1e-6)
    assert "concept_groups" not in data and "label_concepts" not in data
    generate(str(tmp_path / "c"), cfg)
    doc = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert doc["num_concepts"] == cfg.num_concepts and doc["label"]["kind"] == "binary"
    assert "concept_groups" not in doc and "label_concepts" not in doc


# ----------------------------------------------------------------------------------------------
# kind=factors: label, groups, what each modality sees
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shared_unique", "shared"])
def test_factors_label_is_the_sign_bits_of_its_label_factors(mode):
    """The label is class = sum_i 2^i bit_i of the stored sign bits at `label_concepts`, which are
    [shared 0, unique:text 0, unique:audio 0] (or shared 0, 1, 2 for the control) and never nuisance;
    both modes have 8 classes, all present in 2000 samples, roughly balanced."""
    data = sample_arrays(_factors(label_mode=mode, num_train=2000))
    groups, label_idx = data["concept_groups"], data["label_concepts"]
    expected = ([groups["shared"][0], groups["unique:text"][0], groups["unique:audio"][0]]
                if mode == "shared_unique" else groups["shared"][:3])
    assert label_idx == expected
    nuisance = {i for g, idx in groups.items() if g.startswith("nuisance:") for i in idx}
    assert not nuisance & set(label_idx)
    bits = data["concepts"][:, label_idx].astype(np.int64)
    assert np.array_equal(data["labels"], bits[:, 0] + 2 * bits[:, 1] + 4 * bits[:, 2])
    counts = np.bincount(data["labels"], minlength=8)
    assert len(counts) == 8 and counts.min() > 0.08 * len(data["labels"])


def test_factors_label_and_bits_do_not_depend_on_nuisance_amplitude():
    """nuisance_scale changes only how strongly nuisance shows in the features: labels and stored factor
    sign bits stay the same, the features change."""
    a, b = sample_arrays(_factors(nuisance_scale=1.0)), sample_arrays(_factors(nuisance_scale=0.0))
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["concepts"], b["concepts"])
    assert not np.allclose(a["features"]["text"], b["features"]["text"])


@pytest.mark.parametrize("dims", [dict(shared_dim=3, unique_dim=2, nuisance_dim=1, modality_dims=[5, 7]),
                                  dict(shared_dim=4, unique_dim=1, nuisance_dim=0, modality_dims=[5, 7, 3, 2])])
def test_factor_groups_cover_every_concept_once(dims, tmp_path):
    """num_concepts = shared + M unique + M nuisance; the manifest's groups partition 0..K-1 in the order
    shared, unique per modality, nuisance per modality; they survive a manifest round trip, and
    `factor_groups` merges them by role."""
    cfg = _factors(**dims)
    m_count = len(cfg.modality_dims)
    k = cfg.shared_dim + m_count * (cfg.unique_dim + cfg.nuisance_dim)
    m = generate(str(tmp_path / "f"), cfg)
    assert m.num_concepts == k and sample_arrays(cfg)["concepts"].shape[1] == k
    assert sorted(i for idx in m.concept_groups.values() for i in idx) == list(range(k))
    assert [i for idx in m.concept_groups.values() for i in idx] == list(range(k))  # in the documented order
    assert m.concept_groups["shared"] == list(range(cfg.shared_dim))
    assert len([g for g in m.concept_groups if g.startswith("unique:")]) == m_count
    assert len([g for g in m.concept_groups if g.startswith("nuisance:")]) == (m_count if cfg.nuisance_dim else 0)
    assert read_manifest(str(tmp_path / "f")) == m
    roles = factor_groups(m)
    assert len(roles["shared"]) == cfg.shared_dim and len(roles["unique"]) == m_count * cfg.unique_dim
    assert len(roles["nuisance"]) == m_count * cfg.nuisance_dim and roles["label"] == m.label_concepts
    assert m.label.kind == "multiclass" and m.label.num_classes == 8


def test_old_manifest_without_factor_fields_loads(tmp_path):
    """A manifest written before concept_groups / label_concepts existed loads with both None, and
    `factor_groups` says None for it."""
    m = generate(str(tmp_path / "f"), _factors())
    doc = json.loads(m.to_json())
    del doc["concept_groups"], doc["label_concepts"]
    old = Manifest.from_dict(doc)
    assert old.concept_groups is None and old.label_concepts is None and factor_groups(old) is None
    assert "concept_groups" not in old.to_json()


def test_each_modality_shows_shared_and_its_own_factors_only():
    """What a linear probe on time-averaged features finds: text and audio both show the shared factor
    and their own unique and nuisance factors; neither shows the other's unique or nuisance factor
    (which would make a unique factor shared)."""
    from sklearn.linear_model import LogisticRegression

    data = sample_arrays(_factors(num_train=1200, seq_len=8, modality_dims=[12, 10]))
    mask, c, g = data["mask"], data["concepts"], data["concept_groups"]
    half = len(c) // 2

    def acc(modality: str, group: str) -> float:
        x = data["features"][modality].sum(1) / mask.sum(1, keepdims=True)
        y = c[:, g[group][0]]
        return LogisticRegression(max_iter=1000).fit(x[:half], y[:half]).score(x[half:], y[half:])

    for own, other in (("text", "audio"), ("audio", "text")):
        assert acc(own, "shared") > 0.75
        assert acc(own, f"unique:{own}") > 0.75 and acc(own, f"nuisance:{own}") > 0.75
        assert acc(own, f"unique:{other}") < 0.6 and acc(own, f"nuisance:{other}") < 0.6


def test_factors_masks_pad_at_the_front():
    """Same variable-length front padding as the concepts kind: masks are a suffix of real steps, at least
    half the sequence, and padded steps are exactly zero."""
    data = sample_arrays(_factors(seq_len=7))
    mask = data["mask"]
    lengths = mask.sum(1)
    assert lengths.min() >= 4 and lengths.max() == 7
    assert all(mask[i, 7 - n:].all() and not mask[i, : 7 - n].any() for i, n in enumerate(lengths))
    for x in data["features"].values():
        assert not x[~mask].any() and x[mask].std() > 0.5


# ----------------------------------------------------------------------------------------------
# Validation and the CLI
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["kind=factors", "label_mode=shared", "shared_dim=2"], "data.synth.shared_dim"),
    (["kind=factors", "unique_dim=0"], "data.synth.unique_dim"),
    (["kind=factors", "modality_dims=[8]"], "data.synth.modality_dims"),
    (["kind=factor"], "data.synth.kind"),
    (["kind=factors", "label_mode=unique"], "data.synth.label_mode"),
])
def test_bad_factors_config_names_the_key(overrides, key):
    """Configs the factors kind cannot realise are refused before generating, naming the key."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        synth_config(overrides)


def test_factors_config_rules_leave_the_concepts_kind_alone():
    """The factors-only rules do not apply to kind=concepts (one modality is fine there), and the control
    without unique factors is allowed."""
    assert synth_config(["modality_dims=[8]"]).modality_dims == [8]
    assert synth_config(["kind=factors", "label_mode=shared", "unique_dim=0"]).unique_dim == 0


def test_synth_cli_factors_and_inspect_prints_groups(tmp_path, capsys):
    """`data synth kind=factors` writes an 8-class data set with the factor groups in its manifest, and
    `data inspect` prints them."""
    out = str(tmp_path / "f")
    assert main(["data", "synth", "--out", out, "kind=factors", "label_mode=shared", "num_train=64",
                 "num_val=16", "num_test=16", "seq_len=6"]) == 0
    m = read_manifest(out)
    groups, label = factor_layout(synth_config(["kind=factors", "label_mode=shared"]))
    assert m.concept_groups == groups and m.label_concepts == label == [0, 1, 2]
    assert m.num_concepts == 4 + 3 * 4 + 3 * 4 and m.label.num_classes == 8
    capsys.readouterr()
    assert main(["data", "inspect", out]) == 0
    text = capsys.readouterr().out
    assert "unique:audio" in text and "nuisance:vision" in text and "[0, 1, 2]" in text


# ----------------------------------------------------------------------------------------------
# Digits: a real two-view data set shipped inside scikit-learn
# ----------------------------------------------------------------------------------------------


def test_digits_script_and_import_arrays(tmp_path, capsys):
    """scripts/make_digits.py writes the top / bottom halves of the 1797 digit images as [N, 4, 8]
    float32 in [0, 1] plus int64 labels; `data import-arrays` turns them into a 10-class data set."""
    arr = tmp_path / "arr"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_digits.py"), "--out", str(arr)], check=True,
                   capture_output=True, timeout=120)
    top, bottom, labels = (np.load(arr / f"{n}.npy") for n in ("top", "bottom", "labels"))
    assert top.shape == bottom.shape == (1797, 4, 8) and top.dtype == bottom.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))
    assert 0.0 <= min(top.min(), bottom.min()) and max(top.max(), bottom.max()) == 1.0
    from sklearn.datasets import load_digits
    assert np.allclose(np.concatenate([top, bottom], 1) * 16, load_digits().images)
    out = str(tmp_path / "digits")
    assert main(["data", "import-arrays", "--modality", f"top={arr / 'top.npy'}", "--modality",
                 f"bottom={arr / 'bottom.npy'}", "--labels", str(arr / "labels.npy"), "--out", out]) == 0
    m = read_manifest(out)
    assert m.label.kind == "multiclass" and m.label.num_classes == 10
    assert m.modalities["top"].shape == [4, 8] and sum(s.rows for s in m.splits.values()) == 1797
