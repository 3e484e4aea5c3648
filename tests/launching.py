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


def start(out: Path, overrides: list[str], *, launcher: str = "accelerate.commands.launch",
          extra: list[str] = ()) -> subprocess.Popen:
    """Start in its own session so the test can signal / kill the whole job."""
    return subprocess.Popen(launch_cmd(out, overrides, launcher=launcher, extra=list(extra)), cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
