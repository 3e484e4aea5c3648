"""`logging.trackers`: W&B (offline) and MLflow (local file store) receive the same scalars as
metrics.jsonl, plus the run config and the evaluation results; `logging.tensorboard` from older config
files still works; a tracker whose package is missing is a config error. And a clean console:
`s3dist bench moe` prints no profiler start/stop markers and DeepSpeed's op-build line once per job.

Nothing here reaches the network: W&B runs with WANDB_MODE=offline under tmp_path, MLflow writes files.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from s3dist.config import ConfigError, LoggingConfig, RunConfig, load_config, to_dict
from s3dist.metrics import JsonlBackend, TensorBoardBackend, make_logger
from tests.launching import ROOT, TINY, env

# Two logged training steps and an evaluation, with the tag shapes the trainer and evaluator use.
STEPS = [(5, "specialize", {"loss": 2.5, "lr": 1e-3, "expert_load/text/layer0/expert0": 0.25,
                            "expert_balance/text/layer0/cv": 0.125}),
         (10, "select", {"loss": 1.75, "lr": 5e-4, "expert_load/text/layer0/expert0": 0.5,
                         "expert_balance/text/layer0/cv": 0.0625})]
EVAL = {"eval/probe_accuracy": 0.875, "eval/best_keep_fraction": 0.3}


def _drive(run_dir: Path, trackers: list[str]) -> dict:
    """Log STEPS and EVAL through make_logger as the trainer does; returns the config dict it was given."""
    cfg = RunConfig()
    cfg.logging.trackers = trackers
    run_config = to_dict(cfg)
    logger = make_logger(run_dir, True, cfg.logging, run_config=run_config)
    for step, stage, values in STEPS:
        logger.log(step, stage, values)
    logger.histogram(10, "expert_load/text/layer0", [0.5, 0.5])
    logger.summary(10, EVAL, {"eval/sweep": "| p | acc |"})
    logger.close()
    return run_config


def _jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("step", "stage")}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_trackers_config_and_old_tensorboard_key(tmp_path):
    """trackers default to TensorBoard; 'jsonl' is implicit; `tensorboard: false` in an older config
    file still turns TensorBoard off; CLI lists parse; unknown names are refused by name."""
    assert RunConfig().logging.resolved_trackers() == ["tensorboard"]
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"logging": {"every_steps": 5, "tensorboard": False}}))
    assert load_config(str(old)).logging.resolved_trackers() == []
    cli = load_config(None, ["logging.trackers=jsonl,mlflow,tensorboard,mlflow"])
    assert cli.logging.trackers == ["jsonl", "mlflow", "tensorboard", "mlflow"]
    assert LoggingConfig(trackers=["jsonl", "tensorboard"]).resolved_trackers() == ["tensorboard"]
    assert LoggingConfig(trackers=["tensorboard"], tensorboard=False).resolved_trackers() == []
    with pytest.raises(ConfigError, match=r"logging.trackers.*'neptune'.*allowed"):
        LoggingConfig(trackers=["neptune"]).resolved_trackers()


def test_missing_tracker_package_is_a_config_error(monkeypatch):
    """A tracker whose package is not installed names the extra that installs it, on every rank."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    msg = ("logging.trackers contains 'wandb' but the wandb package is not installed: "
           "pip install 's3dist[wandb]'")
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        make_logger(Path("/nonexistent"), False, LoggingConfig(trackers=["wandb"]))


def test_make_logger_backends(tmp_path):
    """metrics.jsonl always; the older bool call still means TensorBoard on/off; other ranks write nothing."""
    for name, logging_cfg, kinds in (("a", False, [JsonlBackend]), ("b", True, [JsonlBackend, TensorBoardBackend]),
                                     ("c", LoggingConfig(), [JsonlBackend, TensorBoardBackend])):
        (tmp_path / name).mkdir()
        logger = make_logger(tmp_path / name, True, logging_cfg)
        assert [type(b) for b in logger.backends] == kinds
        logger.close()
    assert make_logger(tmp_path / "d", False, LoggingConfig()).backends == []
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------
# W&B, offline
# ---------------------------------------------------------------------------------------------


def _wandb_records(path: Path):
    """The records of an offline W&B run file (`run-<id>.wandb`): a 7-byte header, then LevelDB-log
    framing (32 KiB blocks; each chunk: crc32 u32, length u16, type u8 = full/first/middle/last) around
    serialized `wandb_internal_pb2.Record`s. wandb 0.31 ships no Python reader for it any more."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    assert buf[:4] == b":W&B", buf[:7]
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        data, pos = buf[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            pending = data
        elif kind in (3, 4):
            pending += data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _finished_wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The records of an offline W&B run file once it is complete. wandb-core writes the file in its own
    process and can still be flushing when `finish()` has returned (the test read a file without its run
    record about one time in ten): wait for the run's exit record, the last one it writes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(_wandb_records(path))
        except Exception:  # a record still being written: truncated framing or protobuf
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def test_wandb_offline_run_holds_the_jsonl_scalars(tmp_path, monkeypatch):
    """W&B in offline mode (through accelerate's WandBTracker): its history has every metrics.jsonl row's
    scalars at the same step, the evaluation results at the last step, and the flattened run config."""
    pytest.importorskip("wandb", reason="pip install 's3dist[wandb]'")
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's output capture alone
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    (tmp_path / "wandb-dir").mkdir()
    run_dir = tmp_path / "run-w"
    run_dir.mkdir()
    run_config = _drive(run_dir, ["wandb"])

    files = list((tmp_path / "wandb-dir").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    history, config, run = {}, {}, None
    for r in _finished_wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "run":
            run = r.run
    assert run.project == "s3dist" and run.display_name == "run-w"
    rows = _jsonl(run_dir)
    assert [r["step"] for r in rows] == sorted(history) == [5, 10]
    for row in rows:
        assert {k: history[row["step"]][k] for k in _scalars(row)} == _scalars(row)
    assert {k: history[10][k] for k in EVAL} == EVAL
    assert config["moe.num_experts"] == run_config["moe"]["num_experts"]
    assert config["logging.trackers"] == ["wandb"]


# ---------------------------------------------------------------------------------------------
# MLflow, local file store
# ---------------------------------------------------------------------------------------------


def _mlflow_run(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("s3dist")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, runs
    return client, runs[0]


def _assert_mlflow_matches_jsonl(client, run, rows: list[dict]) -> None:
    for key in {k for row in rows for k in _scalars(row)}:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == {row["step"]: row[key] for row in rows if key in row}, key


def test_mlflow_file_store_holds_the_jsonl_scalars(tmp_path, monkeypatch):
    """MLflow (accelerate's MLflowTracker) with no MLFLOW_TRACKING_URI: a file store in <run>/mlruns whose
    metric histories, read back with MlflowClient, equal metrics.jsonl; the evaluation results and the
    flattened config are there too."""
    pytest.importorskip("mlflow", reason="pip install 's3dist[mlflow]'")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_TAGS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by s3dist when unset; restored after the test
    run_dir = tmp_path / "run-m"
    run_dir.mkdir()
    run_config = _drive(run_dir, ["mlflow"])

    client, run = _mlflow_run((run_dir / "mlruns").as_uri())
    assert run.info.run_name == "run-m" and run.info.status == "FINISHED"
    _assert_mlflow_matches_jsonl(client, run, _jsonl(run_dir))
    assert {k: run.data.metrics[k] for k in EVAL} == EVAL
    assert client.get_metric_history(run.info.run_id, "eval/probe_accuracy")[0].step == 10
    assert run.data.params["moe.num_experts"] == str(run_config["moe"]["num_experts"])


def test_deepspeed_is_imported_without_mlflow_which_stays_importable():
    """DeepSpeed imports mlflow for its autotuner when it is installed (seconds of every rank's start);
    s3dist imports DeepSpeed with mlflow kept out (s3dist.importing), and the tracker can still import it."""
    code = ("import sys\n"
            "import s3dist.model.moe\n"
            "from deepspeed.autotuning import autotuner\n"
            "assert 'deepspeed' in sys.modules and 'mlflow' not in sys.modules, 'mlflow came with deepspeed'\n"
            "assert autotuner.has_mlflow is False\n"
            "import mlflow\n"
            "print('mlflow', mlflow.__version__)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("mlflow "), p.stderr[-2000:]


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI, when set, is where the run goes (not <run>/mlruns)."""
    pytest.importorskip("mlflow", reason="pip install 's3dist[mlflow]'")
    elsewhere = (tmp_path / "shared-mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run-e"
    run_dir.mkdir()
    _drive(run_dir, ["mlflow"])
    assert not (run_dir / "mlruns").exists()
    client, run = _mlflow_run(elsewhere)
    _assert_mlflow_matches_jsonl(client, run, _jsonl(run_dir))


@pytest.mark.slow
def test_training_run_with_tensorboard_and_mlflow(tmp_path, monkeypatch):
    """A real 1-process `python -m s3dist.train` with logging.trackers=[tensorboard,mlflow] and no MLFLOW_*
    variables: MLflow's metric histories in <run>/mlruns equal metrics.jsonl, its params are the run's
    config.yaml, TensorBoard still writes."""
    pytest.importorskip("mlflow", reason="pip install 's3dist[mlflow]'")
    out = tmp_path / "run"
    run_env = {k: v for k, v in env().items() if not k.startswith("MLFLOW_")}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this process's MlflowClient only
    cmd = [sys.executable, "-m", "s3dist.train", "--output_dir", str(out), *TINY, "stages.specialize_steps=10",
           "stages.select_steps=5", "eval.run_at_end=false", "logging.trackers=[tensorboard,mlflow]"]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _jsonl(out)
    assert [r["step"] for r in rows] == [5, 10, 15]
    client, run = _mlflow_run((out / "mlruns").as_uri())
    _assert_mlflow_matches_jsonl(client, run, rows)
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert run.data.params["moe.num_experts"] == str(stored["moe"]["num_experts"])
    assert run.data.params["logging.trackers"] == str(["tensorboard", "mlflow"])
    assert list((out / "tb").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------
# Console
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_moe_console_is_clean(tmp_path):
    """`s3dist bench moe` at its smallest on 2 ranks: no kineto profiler_start / profiler_stop markers, and
    DeepSpeed's shm op-build message at most once for the job (rank 0), yet the table is printed."""
    cmd = [sys.executable, "-c", "import sys; from s3dist.cli import main; sys.exit(main(sys.argv[1:]))",
           "bench", "moe", "--ranks", "2", "--case", "single", "--batch", "4", "--steps", "2", "--d-model", "8",
           "--experts", "2", "--topk", "1", "--hidden", "8", "--warmup", "1", "--repeats", "2",
           "--profile-steps", "1"]
    run_env = {k: v for k, v in env().items() if k != "KINETO_LOG_LEVEL"}
    p = subprocess.run(cmd, cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=300)
    console = p.stdout + p.stderr
    assert p.returncode == 0, console[-3000:]
    assert "profiler_start" not in console and "profiler_stop" not in console, console
    assert console.count("built successfully") <= 1, console
    assert "topk-per-modality" in p.stdout
