"""Evaluation on awkward split sizes: vector and sequence modalities, 1 and 2 ranks, a rank with no rows,
one row or an uneven last batch, with and without Stage 3 (both pruning units, both threshold rules).
Nothing may crash, and 2 ranks must give the probe accuracies 1 rank gives (at p = 1 and with calibrated
Stage-3 thresholds, whose representations do not depend on the batch)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.multirank import run_ranks

TEST_ROWS = (1, 5, 11)   # eval batch 4: on 2 ranks a rank gets 0 rows, a single row, or an uneven last batch


def _write(root, kind: str, test_rows: int) -> str:
    from s3dist.data.manifest import LabelSpec
    from s3dist.data.writer import SplitArrays, write_dataset

    rng = np.random.default_rng(test_rows)

    def split(n):
        y = np.arange(n) % 3
        a = rng.normal(size=(n, 7)).astype(np.float32) + y[:, None]               # a vector modality
        if kind == "vector":
            b = rng.normal(size=(n, 5)).astype(np.float32) - y[:, None]
        else:
            b = rng.normal(size=(n, 4, 5)).astype(np.float32) - y[:, None, None]  # a sequence modality
        return SplitArrays(features={"a": a, "b": b}, labels=y.astype(np.int64))

    url = str(root / f"{kind}-{test_rows}")
    write_dataset(url, name="edge", splits={"train": split(48), "val": split(12), "test": split(test_rows)},
                  label=LabelSpec(kind="multiclass", num_classes=3), source="test", rows_per_shard=8)
    return url


def _evaluate_all(rank, world, out_dir, urls):
    from s3dist.config import load_config
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims
    from s3dist.evaluate import evaluate_run
    from s3dist.model.encoder import S3Encoder

    cfg = load_config(None, ["model.d_model=8", "model.num_heads=2", "moe.num_experts=2", "moe.top_k=1",
                             "moe.expert_hidden=8", "data.eval_batch_size=4", "eval.keep_fractions=0.3,1.0",
                             "eval.probe_Cs=1.0"])
    dims = make_dims(*init_distributed(cfg.dist), world)
    results = {}
    rules = [("token_pairs", "calibrated"), ("token_pairs", "batch"), ("sample_pairs", "batch")]
    for key, url, (unit, rule) in [(f"{k}-{u}-{r}", url, (u, r)) for k, url in urls.items() for u, r in rules]:
        import torch

        cfg.stages.prune_unit, cfg.stages.prune_threshold = unit, rule
        torch.manual_seed(0)
        model = S3Encoder({"a": 7, "b": 5}, cfg.model, cfg.moe, ep_size=world, ep_rank=dims.ep_rank)
        attach_expert_groups(model, dims)
        run_dir = out_dir / key
        run_dir.mkdir(exist_ok=True)
        res = evaluate_run(cfg, dims, run_dir, model, url)
        if rank == 0:
            results[key] = {r["keep_fraction"]: r["accuracy"] for r in res["sweep"]}
            results[key]["dropped"] = res["eval_dropped_fraction"]
    return results


@pytest.mark.slow
def test_awkward_eval_splits_on_one_and_two_ranks(tmp_path):
    urls = {f"{kind}-{n}": _write(tmp_path, kind, n) for kind in ("vector", "mixed") for n in TEST_ROWS}
    one = run_ranks(_evaluate_all, 1, tmp_path / "one", urls)[0]
    two = run_ranks(_evaluate_all, 2, tmp_path / "two", urls)[0]
    assert set(one) == set(two) and len(one) == 3 * len(urls)
    for key in one:
        assert one[key]["dropped"] == two[key]["dropped"] == 0.0
        assert one[key][1.0] == pytest.approx(two[key][1.0], abs=1e-9), key
        # The paper's per-batch rule depends on which rows share a batch, which changes with the number of
        # ranks by design; the calibrated rule (the default) must not.
        if key.endswith("calibrated"):
            assert one[key][0.3] == pytest.approx(two[key][0.3], abs=1e-9), key


@pytest.mark.parametrize("argv, needle", [
    (["sweep", "--keep-fractions", "0,a"], "--keep-fractions '0,a': 'a' is not a keep fraction"),
    (["sweep", "--keep-fractions", "0,,1"], "'' is not a keep fraction"),
    (["sweep", "--keep-fractions", "1.5"], "'1.5' is not a keep fraction; give numbers in [0, 1]"),
    (["sweep", "--keep-fractions", "nan"], "'nan' is not a keep fraction"),
    (["eval", "--keep-fraction", "-1"], "--keep-fraction '-1.0': '-1.0' is not a keep fraction"),
])
def test_keep_fractions_outside_0_1_or_not_numbers_exit_2_before_loading(tmp_path, capsys, argv, needle):
    """`s3dist eval / sweep` refuse a keep fraction that is not a number in [0, 1] (it ran as p = 0 or as
    p = 1 before), before reading the run (here: none exists)."""
    from s3dist.cli import main

    assert main([argv[0], "--run", str(tmp_path / "no-run"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_aggregating_runs_refuses_settings_that_would_be_ignored_and_a_run_given_twice(tmp_path, capsys):
    from s3dist.cli import main

    for r in ("a", "b"):
        (tmp_path / r).mkdir()
        (tmp_path / r / "eval.json").write_text(json.dumps({"sweep": [{"keep_fraction": 1.0, "accuracy": 0.5}]}))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["sweep", "--run", a, b, "--keep-fractions", "0.5"]) == 2
    assert "do not apply: sweep each run first" in capsys.readouterr().err
    assert main(["sweep", "--run", a, a]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert main(["sweep", "--run", a, str(tmp_path / "c")]) == 2
    assert "eval.json' is missing: evaluate that run first" in capsys.readouterr().err
    assert main(["sweep", "--run", a, b]) == 0


def test_aggregating_runs_warns_when_they_differ_in_more_than_the_seed(tmp_path, caplog):
    """`s3dist sweep --run A B` averages eval.json files as they are: runs that differ in a setting (not only in
    seed, name or where they ran) get a warning naming each such key and the runs' values."""
    import logging

    from s3dist.cli import main
    from s3dist.config import load_config, save_config

    for r, over in (("a", ["seed=0", "moe.granularity=4"]), ("b", ["seed=1", "moe.granularity=8"]),
                    ("c", ["seed=2", "moe.granularity=4", "name=other"])):
        (tmp_path / r).mkdir()
        (tmp_path / r / "eval.json").write_text(json.dumps({"sweep": [{"keep_fraction": 1.0, "accuracy": 0.5}]}))
        save_config(load_config(None, over + [f"output_dir={tmp_path / r}"]), tmp_path / r / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        assert main(["sweep", "--run", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "differ in more than their seed" in caplog.text and "moe.granularity = 4, 8" in caplog.text
    assert "seed =" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        assert main(["sweep", "--run", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "ac")]) == 0
    assert "differ" not in caplog.text and (tmp_path / "ac" / "sweep_seeds.json").exists()


def test_embed_refuses_a_folder_as_out_a_batch_below_one_and_a_model_that_is_not_an_export(tmp_path, capsys):
    """Checked before any model loads (the first three) or named in one line (the last): no traceback, and no
    temporary file left next to --out."""
    from s3dist.cli import main

    (tmp_path / "outdir").mkdir()
    (tmp_path / "not-an-export").mkdir()
    cases = [(["--model", str(tmp_path / "x"), "--out", str(tmp_path / "outdir")],
              "outdir is a folder; give the file to write, e.g. " + str(tmp_path / "outdir" / "emb.parquet")),
             (["--model", str(tmp_path / "x"), "--out", str(tmp_path / "e.parquet"), "--batch-size", "0"],
              "--batch-size 0 must be >= 1"),
             (["--model", str(tmp_path / "x"), "--out", str(tmp_path / "e.parquet"), "--keep-fraction", "2"],
              "--keep-fraction 2.0 is outside [0, 1]"),
             (["--model", str(tmp_path / "not-an-export"), "--out", str(tmp_path / "e.parquet")], "not-an-export")]
    for argv, needle in cases:
        assert main(["embed", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "config.json").write_text('{"modalities": [')
    assert main(["embed", "--model", str(tmp_path / "damaged"), "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path / 'damaged' / 'config.json'}' is not valid JSON" in err and "Traceback" not in err, err
    shutil.rmtree(tmp_path / "damaged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-an-export", "outdir"]


def test_commands_replace_only_their_own_outputs_and_name_a_destination_under_a_file(tmp_path, capsys):
    """`export --out X.safetensors` and `embed --out F` leave a file they did not write alone; `eval --out`,
    `sweep --out` and `output_dir` under a file, and `eval --model` of a file that is not an export, are each
    refused in one line naming the path. All before any model or data loads: nothing else is written."""
    from s3dist.cli import main
    from s3dist.config import ConfigError, load_config
    from s3dist.rundir import resolve_run_dir

    from s3dist.config import save_config

    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    (tmp_path / "run").mkdir()
    (tmp_path / "run_b").mkdir()
    save_config(load_config(None, []), tmp_path / "run_b" / "config.yaml")
    (tmp_path / "run_b" / "eval.json").write_text("{}")
    cases = [(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "notes.safetensors")],
              "notes.safetensors exists and is not an s3dist export, so it was left alone"),
             (["embed", "--model", str(tmp_path / "run"), "--out", str(notes)],
              "notes.txt exists and is not an s3dist embedding file, so it was left alone"),
             (["embed", "--model", str(tmp_path / "run"), "--out", str(notes / "emb.parquet")],
              f"'{notes}' is a file, not a folder"),
             (["export", "--run", str(tmp_path / "run"), "--out", str(notes / "sub" / "exported")],
              f"'{notes}' is a file, not a folder"),
             (["eval", "--run", str(tmp_path / "run"), "--out", str(notes)], f"--out {notes} is a file, not a folder"),
             (["sweep", "--run", str(tmp_path / "run"), str(tmp_path / "b"), "--out", str(notes / "x")],
              f"'{notes}' is a file, not a folder"),
             (["eval", "--model", str(notes)], "notes.txt' is not an s3dist export"),
             (["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path)],
              f"--out {tmp_path} exists and is not an s3dist export folder, so it was left alone"),
             (["export", "--run", str(tmp_path / "run"), "--out", str(notes)],
              f"--out {notes} is a file, not a folder"),
             (["sweep", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "run_b"), "--keep-fractions", "0.5"],
              "is another run's directory, and its eval.json is that run's evaluation")]
    (tmp_path / "notes.safetensors").write_bytes(b"user data")
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    assert notes.read_text() == "keep me" and (tmp_path / "notes.safetensors").read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.safetensors", "notes.txt", "run", "run_b"]
    assert (tmp_path / "run_b" / "eval.json").read_text() == "{}"
    for output_dir in (notes, notes / "run"):
        with pytest.raises(ConfigError, match=rf"output_dir {output_dir} (is|cannot be written: '{notes}' is) a file, "
                                              r"not a folder; choose another output_dir"):
            resolve_run_dir(load_config(None, [f"output_dir={output_dir}"]), is_main=True)


def test_eval_names_a_recorded_data_set_that_has_moved(tmp_path, capsys):
    """`s3dist eval --model X.safetensors` of a run whose data.path is gone says the data set has moved and
    which option points at its new place; given with --data, a missing data set is just named."""
    import torch
    from safetensors.torch import save_file

    from s3dist.cli import main
    from s3dist.config import load_config, to_dict

    gone = tmp_path / "gone"
    model = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(model),
              metadata={"s3dist_config": json.dumps(to_dict(load_config(None, [f"data.path={gone}"])))})
    assert main(["eval", "--model", str(model), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert (f"'{model}' trained on the data set at '{gone}', which is no longer there. If it has moved, pass its new "
            f"place with --data URL") in err, err
    assert main(["eval", "--model", str(model), "--data", str(gone), "--out", str(tmp_path / "ev")]) == 2
    assert f"'{gone}' is not an s3dist data set" in capsys.readouterr().err
