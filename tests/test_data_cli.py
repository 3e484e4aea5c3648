"""`s3dist data ...` and `s3dist bench data` through the real console entry point: exit codes, output,
and bad input reported on stderr with exit code 2 and no traceback."""

from __future__ import annotations

import pickle

import numpy as np

from s3dist.cli import main
from s3dist.data.manifest import read_manifest


def test_synth_overrides_and_inspect(tmp_path, capsys):
    """`data synth` applies key=value overrides; `data inspect` prints modalities, split sizes and the
    label balance that matches the stored labels."""
    out = str(tmp_path / "s")
    assert main(["data", "synth", "--out", out, "num_concepts=5", "num_train=64", "num_val=16", "num_test=16",
                 "seq_len=6"]) == 0
    m = read_manifest(out)
    assert m.num_concepts == 5 and m.modalities["text"].shape == [6, 24] and m.splits["train"].rows == 64
    capsys.readouterr()
    assert main(["data", "inspect", out]) == 0
    text = capsys.readouterr().out
    assert "text" in text and "[6, 24]" in text
    train_line = next(line for line in text.splitlines() if line.startswith("train"))
    zeros, ones = (int(part.split(":")[1].split()[0]) for part in train_line.split()[3:6:2])
    assert zeros + ones == 64 and ones > 0


def test_bad_input_exits_2_with_message_not_traceback(tmp_path, capsys):
    """Unknown synth key, inspect of a folder without a manifest, an existing --out, a refused pickle,
    a malformed --modality and a URL with a mistyped protocol all exit 2 with one readable line on stderr."""
    cases = [
        (["data", "inspect", "fiel:///tmp/x"], "'fiel:///tmp/x' is not a URL fsspec can open"),
        (["data", "synth", "--out", "fiel:///tmp/x"], "'fiel:///tmp/x' is not a URL fsspec can open"),
        (["data", "synth", "--out", str(tmp_path / "a"), "bogus=1"], "unknown config key 'data.synth.bogus'"),
        (["data", "inspect", str(tmp_path / "none")], "manifest.json not found"),
        (["data", "import-arrays", "--modality", "novalue", "--labels", "y.npy", "--out", str(tmp_path / "b")],
         "is not NAME=FILE.npy"),
    ]
    evil = tmp_path / "sarcasm.pkl"
    evil.write_bytes(pickle.dumps({"train": np.int64}))  # a global that is not numpy data
    cases.append((["data", "import-multibench", "--benchmark", "sarcasm", "--source", str(evil), "--out",
                   str(tmp_path / "c")], "refused to load global 'numpy.int64'"))
    for argv, needle in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "c").exists()


def test_import_arrays_cli(tmp_path, capsys):
    """`data import-arrays` with two modalities writes the three splits with the requested fractions."""
    n = 50
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(n, 4)))
    np.save(tmp_path / "z.npy", np.zeros((n, 3, 2), np.float32))
    np.save(tmp_path / "y.npy", np.arange(n) % 2)
    out = str(tmp_path / "mine")
    assert main(["data", "import-arrays", "--modality", f"x={tmp_path / 'x.npy'}", "--modality",
                 f"z={tmp_path / 'z.npy'}", "--labels", str(tmp_path / "y.npy"), "--out", out,
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "1"]) == 0
    m = read_manifest(out)
    assert {s: sp.rows for s, sp in m.splits.items()} == {"train": 30, "val": 10, "test": 10}
    assert m.name == "mine" and set(m.modalities) == {"x", "z"}


def test_bench_data_runs_on_a_given_path(tmp_path, capsys):
    """`bench data --path` times both readers over the same rows and writes a JSON record with command,
    versions, machine, date and figures."""
    import json
    out = str(tmp_path / "s")
    assert main(["data", "synth", "--out", out, "num_train=256", "num_val=16", "num_test=16",
                 "rows_per_shard=64"]) == 0
    rec = tmp_path / "bench.json"
    assert main(["bench", "data", "--path", out, "--batch-size", "64", "--repeats", "1", "--step-ms", "1",
                 "--epochs", "3", "--json", str(rec)]) == 0
    doc = json.loads(rec.read_text())
    assert doc["figures"]["rows"] == 256 and doc["figures"]["samples_per_s"]["pyarrow"] > 0
    # 4 shards, 2 read threads: the stream decoded in parallel, and pyarrow was also timed that way
    assert doc["figures"]["readers_used"] == 2 and "--read-threads 2" in doc["command"]
    assert doc["figures"]["samples_per_s"]["pyarrow_parallel"] > 0
    assert {"command", "versions", "machine", "date"} <= set(doc) and "bench data" in doc["command"]
    # the epoch-start stall of a training stream, with and without reading the next epoch ahead:
    # one wait per epoch after the first, and the same batches per epoch either way
    start = doc["figures"]["epoch_start"]
    assert "--step-ms 1" in doc["command"]
    for key in ("read_ahead", "no_read_ahead"):
        assert len(start[key]["epoch_start_wait_ms"]) == 2 and start[key]["batches_per_epoch"] == 4


def test_import_arrays_reports_nonfinite_counts_per_split_and_modality(tmp_path, capsys):
    """`data import-arrays` on an array holding NaN / inf writes the data set and says, per split and
    modality, how many values are non-finite and what data.nonfinite=zero does; a clean modality is
    not named."""
    n = 50
    x = np.random.default_rng(0).normal(size=(n, 3, 2)).astype(np.float32)
    x[:, 1, 0] = np.nan                # one NaN in every row: each split's count is its row count
    x[0, 2, 1] = np.inf                # row 0 lands in some split: that split counts one more
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "clean.npy", np.zeros((n, 4), np.float32))
    np.save(tmp_path / "y.npy", np.arange(n) % 2)
    out = str(tmp_path / "d")
    capsys.readouterr()
    assert main(["data", "import-arrays", "--modality", f"x={tmp_path / 'x.npy'}", "--modality",
                 f"clean={tmp_path / 'clean.npy'}", "--labels", str(tmp_path / "y.npy"), "--out", out]) == 0
    err = capsys.readouterr().err
    m = read_manifest(out)
    rows = {s: sp.rows for s, sp in m.splits.items()}
    with_inf = next(s for s, sp in m.splits.items() if sp.nonfinite_totals()["x"] == sp.rows + 1)
    for s, r in rows.items():
        assert f"split '{s}' modality 'x' holds {r + (s == with_inf)} NaN/inf values" in err, err
    assert "'clean'" not in err and err.count("data.nonfinite=zero (replace with 0)") == 3


def test_inspect_names_a_truncated_shard_and_verify_lists_bad_shards(tmp_path, capsys):
    """`data inspect` on a data set with a truncated shard exits 2 naming the shard, saying its sha256 no
    longer matches the manifest and what to do (no pyarrow traceback); `inspect --verify` exits 2 listing
    exactly the bad shards, and passes on an intact data set."""
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "num_train=96", "num_val=16", "num_test=16", "seq_len=4",
                 "rows_per_shard=32"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", "--verify", str(out)]) == 0
    assert "verified   5 shards" in capsys.readouterr().out
    shard = out / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    (out / "test-00000.parquet").unlink()
    assert main(["data", "inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "train-00001.parquet" in err and "does not match the manifest" in err and "--verify" in err, err
    assert "Traceback" not in err
    assert main(["data", "inspect", "--verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 of the shards" in err and "train-00001.parquet" in err
    assert "test-00000.parquet (split 'test'): missing" in err
    assert "train-00000.parquet" not in err and "train-00002.parquet" not in err


def test_verify_also_runs_the_checks_training_runs(tmp_path, capsys):
    """A manifest edited after writing (rows, shape, class count) keeps every sha256 valid, so --verify checked
    nothing of it; it now refuses what training would refuse, naming the split or shard."""
    import json

    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "num_train=64", "num_val=16", "num_test=16", "seq_len=4"]) == 0
    original = (out / "manifest.json").read_text()
    edits = [(lambda d: d["splits"]["train"].update(rows=999), "declares 999 rows"),
             (lambda d: d["modalities"]["text"].update(shape=[4, 7]), "column 'text'"),
             (lambda d: d["label"].update(num_classes=1), "outside the declared 1 classes")]
    for edit, needle in edits:
        doc = json.loads(original)
        edit(doc)
        (out / "manifest.json").write_text(json.dumps(doc))
        capsys.readouterr()
        assert main(["data", "inspect", "--verify", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
