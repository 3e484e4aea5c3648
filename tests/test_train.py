"""End-to-end training: 2 real gloo ranks with ep_size=2, and the `accelerate launch` entry point."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
import yaml

from tests.multirank import run_ranks

from tests.launching import TINY


def _train(rank, world, out_dir, overrides):
    from s3dist.config import load_config
    from s3dist.train import run

    cfg = load_config(None, overrides + [f"output_dir={out_dir / 'run'}"])
    trainer = run(cfg)
    model = trainer.model
    # experts under DeepSpeed's per-expert names (the state dict's; the parameters are stacked per layer)
    expert = {n: p.clone() for n, p in model.state_dict().items() if ".deepspeed_experts." in n}
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if getattr(p, "allreduce", True)}
    return {"expert": expert, "dense": dense, "ep_rank": trainer.dims.ep_rank}


@pytest.mark.slow
def test_two_rank_expert_parallel_training(tmp_path):
    """ep_size=2 on 2 ranks: loss decreases, each rank holds only its experts, dense params stay identical."""
    over = TINY + ["stages.specialize_steps=40", "stages.select_steps=10", "dist.ep_size=2"]
    res = run_ranks(_train, 2, tmp_path, over)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    s1 = [r["loss"] for r in rows if r["stage"] == "specialize"]
    assert len(s1) == 8 and s1[-1] < s1[0] - 0.05, s1
    # Expert ownership: disjoint halves of the 2 modalities x 4 experts = 8 experts.
    n_experts = [len({n.split("deepspeed_experts.")[1].split(".")[0] for n in r["expert"]}) for r in res]
    assert n_experts == [4, 4]
    assert all(not torch.equal(res[0]["expert"][n], res[1]["expert"][n]) for n in res[0]["expert"])
    assert res[0]["dense"].keys() == res[1]["dense"].keys()
    for n, p in res[0]["dense"].items():
        assert torch.equal(p, res[1]["dense"][n]), f"dense param {n} differs across ranks"
    shared = sum(p.numel() for p in res[0]["dense"].values())
    per_rank_expert = sum(p.numel() for p in res[0]["expert"].values())
    assert per_rank_expert == sum(p.numel() for p in res[1]["expert"].values())
    assert shared > 0 and per_rank_expert > 0


def test_a_start_that_never_reached_a_step_starts_over_without_a_flag(tmp_path, caplog):
    """A start that failed before its first logged step or checkpoint (e.g. a tracker without its API key) left
    config.yaml: the same command starts over in it, logging so; checkpoints set aside earlier are kept. Once a
    step is logged, the directory holds a run and a fresh start needs --resume or --overwrite."""
    import logging

    from s3dist import runlock
    from s3dist.config import ConfigError, load_config, save_config
    from s3dist.rundir import resolve_run_dir

    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "checkpoints" / "abandoned-20261201-120000").mkdir(parents=True)
    cfg = load_config(None, [f"output_dir={out}"])
    save_config(cfg, out / "config.yaml")  # as the failed start wrote it
    (out / "ranks.jsonl").write_text('{"rank": 0}\n')
    (out / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.INFO, logger="s3dist"):
        assert resolve_run_dir(cfg, True) == out
    runlock.release(out)
    assert "holds a start that never reached a step: starting over in it" in caplog.text
    assert not (out / "tb").exists() and not (out / "ranks.jsonl").exists()
    assert (out / "checkpoints" / "abandoned-20261201-120000").exists()
    (out / "metrics.jsonl").write_text('{"step": 5, "stage": "specialize", "loss": 1.0}\n')
    try:
        with pytest.raises(ConfigError, match="already holds a run.*--resume auto.*--overwrite"):
            resolve_run_dir(cfg, True)
    finally:
        runlock.release(out)


@pytest.mark.slow
def test_accelerate_launch_run_directory_contract(reference_run):
    """`accelerate launch --config_file launch_configs/cpu_2proc.yaml -m s3dist.train` (the session's
    `reference_run`, tests/conftest.py) leaves the documented run directory: config.yaml, metrics.jsonl, tb/,
    checkpoints/, eval.json."""
    out = reference_run
    stderr = (out.parent / "launch.stderr").read_text()
    noisy = [ln for ln in stderr.splitlines() if "FutureWarning" in ln or "DeprecationWarning" in ln]
    assert not noisy, noisy  # a default run uses current APIs: users should not learn to ignore warnings
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["stages"]["specialize_steps"] == 40 and cfg["data"]["modalities"] == ["text", "audio"]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # a time series of training steps only: evaluation results live in eval.json and TensorBoard
    assert rows and all({"step", "stage", "loss", "samples_per_s"} <= r.keys() for r in rows)
    assert {r["stage"] for r in rows} == {"specialize", "select"}
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").exists()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert list((out / "checkpoints" / latest).glob("layer_*_expert_*_model_states.pt"))
    ev = json.loads((out / "eval.json").read_text())
    assert {"probe_accuracy", "sweep", "best_keep_fraction", "best_accuracy", "modalities", "stage3",
            "eval_dropped_fraction"} <= ev.keys()
    assert ev["eval_dropped_fraction"] == 0.0
    assert {r["keep_fraction"] for r in ev["sweep"]} == {0.3, 1.0}
    ranks = [json.loads(ln) for ln in (out / "ranks.jsonl").read_text().splitlines()]
    assert sorted(r["rank"] for r in ranks) == [0, 1]



@pytest.mark.slow
@pytest.mark.parametrize("damage, needle", [
    ("delete", "test-00000.parquet (split 'test') is missing"),
    ("nan", "split 'test': 1 NaN/inf values in modality 'x'"),
    ("empty", "split 'val' is empty (0 rows), and the final evaluation reads it"),
])
def test_a_damaged_evaluation_split_stops_the_run_before_training(tmp_path, capsys, damage, needle):
    """The final evaluation reads val and test: a missing shard, a NaN or no rows there stop the run when it
    starts (exit 2, the file named), not after all the training."""
    import numpy as np

    from s3dist.data.arrays import import_arrays
    from s3dist.data.manifest import read_manifest
    from s3dist.train import main

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 4)).astype(np.float32), np.arange(60) % 2
    ds = tmp_path / "ds"
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    import_arrays({"x": str(tmp_path / "x.npy")}, str(tmp_path / "y.npy"), str(ds))
    if damage == "delete":
        (ds / "test-00000.parquet").unlink()
    elif damage == "empty":  # a manifest whose val split lists no shard (as an edited or truncated one may)
        doc = json.loads((ds / "manifest.json").read_text())
        doc["splits"]["val"].update(files=[], rows=0, checksums={}, nonfinite={})
        (ds / "manifest.json").write_text(json.dumps(doc))
    else:
        import pyarrow.parquet as pq

        # one test sample gets a NaN (the seeded split puts it in test again), and the data set is written anew
        first = pq.read_table(ds / "test-00000.parquet", columns=["id"]).column("id")[0].as_py()
        x[first, 0] = np.nan
        np.save(tmp_path / "x.npy", x)
        import_arrays({"x": str(tmp_path / "x.npy")}, str(tmp_path / "y.npy"), str(ds), overwrite=True)
        assert read_manifest(str(ds)).splits["test"].nonfinite_totals() == {"x": 1}
    run = tmp_path / "run"
    assert main(["--output_dir", str(run), f"data.path={ds}", "data.batch_size=8", "stages.specialize_steps=2",
                 "stages.select_steps=1", "logging.progress=false"]) == 2
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_a_resume_names_a_data_set_that_moved_and_goes_on_where_it_is_now(tmp_path, capsys, caplog):
    """`--resume auto` of a run whose data.path is gone says the data set has moved and how to point at its new
    place; doing so continues the run (the same shards: no data-changed warning)."""
    import shutil

    import numpy as np

    from s3dist.data.arrays import import_arrays
    from s3dist.train import main

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(60, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.arange(60) % 2)
    import_arrays({"x": str(tmp_path / "x.npy")}, str(tmp_path / "y.npy"), str(tmp_path / "ds"))
    run = tmp_path / "run"
    args = ["--output_dir", str(run), "data.batch_size=8", "stages.specialize_steps=2", "logging.progress=false",
            "eval.run_at_end=false", "checkpoint.every_steps=2"]
    assert main(args + [f"data.path={tmp_path / 'ds'}", "stages.select_steps=1"]) == 0
    shutil.move(tmp_path / "ds", tmp_path / "moved")
    capsys.readouterr()
    assert main(args + ["--resume", "auto", "stages.select_steps=3"]) == 2
    err = capsys.readouterr().err
    assert (f"checkpoint '{run}/checkpoints/step-00000003-select' trained on the data set at '{tmp_path / 'ds'}', "
            f"which is no longer there. If it has moved, pass its new place with data.path=URL --force-config"
            ) in err, err
    with caplog.at_level(logging.WARNING, logger="s3dist"):
        assert main(args + ["--resume", "auto", "stages.select_steps=3", f"data.path={tmp_path / 'moved'}",
                            "--force-config"]) == 0
    assert "--force-config" in caplog.text  # the warning of the forced key is seen here ...
    assert "not the data the checkpoint was trained on" not in caplog.text  # ... and the data's is not


@pytest.mark.slow
def test_a_resume_onto_a_corrupted_checkpoint_names_the_one_to_take_instead(tmp_path, capsys):
    """`--resume auto` whose newest checkpoint has a damaged file exits 2 naming the file and the newest other
    complete checkpoint; resuming that one as told continues the run."""
    from s3dist.train import main

    run = tmp_path / "run"
    args = ["--output_dir", str(run), "data.synth.num_train=64", "data.batch_size=8", "stages.specialize_steps=4",
            "stages.select_steps=0", "stages.run=[specialize]", "logging.progress=false", "eval.run_at_end=false",
            "checkpoint.every_steps=2"]
    assert main(args) == 0
    newest, older = run / "checkpoints" / "step-00000004-specialize", run / "checkpoints" / "step-00000002-specialize"
    victim = sorted(newest.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:50])
    capsys.readouterr()
    assert main(args + ["--resume", "auto", "stages.specialize_steps=6"]) == 2
    err = capsys.readouterr().err
    assert f"'{victim}' does not match its recorded sha256" in err, err
    assert f"resume from the newest other complete checkpoint with --resume {older}" in err, err
    assert main(args + ["--resume", str(older), "stages.specialize_steps=6"]) == 0
    assert (run / "checkpoints" / "step-00000006-specialize").is_dir()


def test_a_folder_with_a_recipe_or_a_foreign_data_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    """A folder whose config.yaml s3dist did not write (a recipe kept there) is not a failed start to clear, and
    --overwrite does not clear a run whose data/ is not a data set: both exit 2 before anything is touched."""
    from s3dist.train import main

    exp = tmp_path / "exp"
    (exp / "samples").mkdir(parents=True)
    recipe = "# my recipe\nstages:\n  specialize_steps: 2\n  select_steps: 1\n"
    (exp / "config.yaml").write_text(recipe)
    (exp / "samples" / "mine.csv").write_text("keep")
    (exp / "eval.json").write_text("{}")
    tiny = ["logging.progress=false", "stages.specialize_steps=2", "stages.select_steps=1", "eval.run_at_end=false"]
    assert main(["--config", str(exp / "config.yaml"), "--output_dir", str(exp), *tiny]) == 2
    assert "has a config.yaml that s3dist did not write" in capsys.readouterr().err
    assert (exp / "config.yaml").read_text() == recipe and (exp / "samples" / "mine.csv").exists()
    assert (exp / "eval.json").exists() and not (exp / "run.lock").exists()

    run = tmp_path / "run"
    assert main(["--output_dir", str(run), *tiny]) == 0
    assert (run / "config.yaml").read_text().startswith("# s3dist run config")
    shutil.rmtree(run / "data")
    (run / "data").mkdir()
    (run / "data" / "notes.txt").write_text("keep")
    assert main(["--output_dir", str(run), "--overwrite", *tiny]) == 2
    assert "has a folder data/ that is not an s3dist data set" in capsys.readouterr().err
    assert (run / "metrics.jsonl").exists() and list((run / "checkpoints").iterdir())


def test_only_a_lost_peer_loses_its_traceback():
    """main() reports a collective that failed because another rank is gone in one line (its traceback only
    shows where this rank waited); any other error, a bug or a port in use, keeps its traceback."""
    import torch.distributed as dist

    from s3dist.exits import lost_a_peer as _lost_a_peer

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17837."
    timeout = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv"
    assert _lost_a_peer(RuntimeError(gloo)) and _lost_a_peer(RuntimeError(timeout))
    assert _lost_a_peer(dist.DistBackendError("NCCL error: remote process exited or there was a network error"))
    assert not _lost_a_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not _lost_a_peer(dist.DistNetworkError("The server socket has failed to listen: address already in use"))
    assert not _lost_a_peer(ValueError(gloo))


def test_a_single_process_command_binds_no_port(tmp_path):
    """A plain one-process command (no launcher: `python -m s3dist.train`, `s3dist eval`) rendezvous in
    process, so it starts even when the port in MASTER_PORT is taken (two such commands on one host used to
    race for a free port), and its world of one still runs collectives."""
    import os
    import socket
    import subprocess
    import sys

    code = (
        "import torch.distributed as dist\n"
        "from s3dist.config import DistConfig\n"
        "from s3dist.dist import init_distributed\n"
        "rank, _, world, _, backend = init_distributed(DistConfig())\n"
        "t = __import__('torch').ones(2)\n"
        "dist.all_reduce(t)\n"
        "print('OK', rank, world, backend, t.tolist())\n"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(MASTER_PORT=str(busy.getsockname()[1]), DS_ACCELERATOR="cpu")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK 0 1 gloo [1.0, 1.0]" in out.stdout, out.stdout
