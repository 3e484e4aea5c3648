"""Start real `accelerate launch` jobs of s3dist.train from tests (2 CPU processes, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from s3dist.dist import free_port

ROOT = Path(__file__).resolve().parents[1]

# Small but real: 2 modalities, 4 experts each, enough steps to see learning.
TINY = ["data.synth.num_train=512", "data.synth.num_val=128", "data.synth.num_test=128",
        "data.synth.modality_dims=12,8", "data.synth.seq_len=8", "data.batch_size=32",
        "model.d_model=32", "moe.expert_hidden=32", "logging.every_steps=5", "checkpoint.every_steps=20",
        "eval.keep_fractions=0.3,1.0", "eval.probe_Cs=1.0"]

# The uninterrupted 2-rank ep=2 run that the slow tests share, trained once per session (`reference_run` in
# tests/conftest.py): test_checkpoint and test_runlock compare jobs of the same command, killed and resumed,
# with it; test_pretrained exports it; test_train checks its run directory. rows_per_shard=40 cuts each split
# into several shards (test: 40, 40, 40, 8 rows; train: 13), so 2 ranks read whole, uneven shards of the test
# split and every other row of the training split. It evaluates at the end (eval.json, a TINY sweep); the jobs
# compared with it need not (eval.run_at_end=false changes no weight and no logged loss).
REFERENCE = TINY + ["stages.specialize_steps=40", "stages.select_steps=20", "checkpoint.every_steps=10",
                    "checkpoint.keep_last=10", "dist.ep_size=2", "data.synth.rows_per_shard=40"]


def launch_cmd(out: Path, overrides: list[str], *, launcher: str = "accelerate.commands.launch",
               extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", launcher, "--config_file", str(ROOT / "launch_configs" / "cpu_2proc.yaml"),
            "--main_process_port", str(free_port()), "-m", "s3dist.train", "--output_dir", str(out), *extra,
            *overrides]


def env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(out: Path, overrides: list[str], *, extra: list[str] = (), timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(launch_cmd(out, overrides, extra=list(extra)), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    return p


def run_forked(out: Path, overrides: list[str], *, extra: list[str] = ()) -> subprocess.CompletedProcess:
    """The job `run` starts, on 2 ranks forked from the test session's server (tests/multirank.py) instead of
    through `accelerate launch`: for tests of what a run does, not of how it is launched."""
    from tests.multirank import run_main

    return run_main("s3dist.train", ["--output_dir", str(out), *extra, *overrides])


def start(out: Path, overrides: list[str], *, launcher: str = "accelerate.commands.launch",
          extra: list[str] = ()) -> subprocess.Popen:
    """Start in its own session so the test can signal / kill the whole job."""
    return subprocess.Popen(launch_cmd(out, overrides, launcher=launcher, extra=list(extra)), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
