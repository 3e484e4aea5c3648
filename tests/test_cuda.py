"""The CUDA path, on a machine with a GPU (skipped elsewhere; CI has none).

The rest of the suite hides GPUs (conftest.py); these tests start their jobs with the devices put
back, as a user on a GPU node would: `accelerate launch --config_file launch_configs/gpu_1.yaml`.
What they pin: one GPU trains all three stages in fp32 and bf16 and evaluates; fp32 on CUDA computes
the same losses as the CPU path (the model code has no device-specific branch that changes the math);
`s3dist bench train` runs on CUDA and reports model FLOPs and MFU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import conftest
from tests.launching import ROOT, TINY

STEPS = ["stages.specialize_steps=40", "stages.select_steps=10", "dist.ep_size=1"]


def _gpu_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DS_ACCELERATOR")  # init_distributed picks cuda
    if conftest.GPU_DEVICES is None:
        env.pop("CUDA_VISIBLE_DEVICES")
    else:
        env["CUDA_VISIBLE_DEVICES"] = conftest.GPU_DEVICES
    return env


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=_gpu_env(),
                       capture_output=True, text=True, timeout=120)
    return p.returncode == 0 and int(p.stdout.split()[-1]) > 0


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")]


def _train(out, overrides, env, *, gpu: bool = True):
    # On the GPU as a user would start it; the CPU reference as a plain world of one (gpu_1.yaml's
    # gpu_ids would make accelerate put the GPU back).
    launch = (["-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch_configs" / "gpu_1.yaml")]
              if gpu else [])
    cmd = [sys.executable, *launch, "-m", "s3dist.train", "--output_dir", str(out), *TINY, *STEPS, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(rows, stage):
    return [r["loss"] for r in rows if r["stage"] == stage]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_gpu_trains_all_stages_and_evaluates(tmp_path, dtype):
    out = tmp_path / "run"
    rows = _train(out, [f"dist.dtype={dtype}"], _gpu_env())
    rank = json.loads((out / "ranks.jsonl").read_text().splitlines()[0])
    assert rank["device"] == "cuda:0" and rank["backend"] == "nccl" and rank["dtype"] == dtype, rank
    s1 = _losses(rows, "specialize")
    assert len(s1) == 8 and s1[-1] < s1[0] - 0.05, s1
    assert all(r["memory_mb"] > 0 for r in rows if "memory_mb" in r)  # CUDA allocator figure
    ev = json.loads((out / "eval.json").read_text())
    assert {"probe_accuracy", "sweep", "best_keep_fraction", "best_accuracy"} <= ev.keys()
    assert 0.5 < ev["probe_accuracy"] <= 1.0, ev


def test_fp32_cuda_losses_match_cpu(tmp_path):
    """Same seed, same data, one process: the CUDA losses follow the CPU ones. The augmentations are
    off (CUDA and CPU generators draw different masks and noise from the same seed) and TF32 too
    (cuDNN convolutions use it by default); what is left is summation order."""
    gpu_env = dict(_gpu_env(), NVIDIA_TF32_OVERRIDE="0")
    cpu_env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")  # conftest's: GPUs hidden
    same = ["dist.dtype=fp32", "stages.time_mask=0", "stages.feature_dropout=0", "stages.noise_std=0"]
    gpu = _train(tmp_path / "gpu", same, gpu_env)
    cpu = _train(tmp_path / "cpu", same, cpu_env, gpu=False)
    for stage in ("specialize", "select"):
        g, c = _losses(gpu, stage), _losses(cpu, stage)
        assert len(g) == len(c) > 0
        print(stage, "gpu", g, "cpu", c)
        assert g[0] == pytest.approx(c[0], rel=1e-4), (stage, g, c)
        assert g[-1] == pytest.approx(c[-1], rel=1e-2), (stage, g, c)


def test_bench_train_on_cuda_reports_mfu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "s3dist.cli", "bench", "train", "--ranks", "1", "--ep", "1", "--no-compare",
           "--repeats", "5", "--warmup", "2", "--profile-steps", "1", "--json", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=_gpu_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert "gpu" in rec["machine"], rec["machine"]
    lay = rec["figures"]["layouts"]["s3 ep=1"]
    assert lay["flops_per_step_per_rank"][0] > 0 and lay["step_peak_tensor_mb_per_rank"][0] > 0
    if rec["figures"]["peak_tflops_per_device"]:  # a GPU with a known peak
        assert 0 < lay["mfu"] < 1
