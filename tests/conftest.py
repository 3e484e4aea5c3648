"""Session set-up shared by every test tier.

DeepSpeed JIT-compiles a small CPU communication op the first time a process group starts. Built
lazily, the first multi-rank test would compile it in both ranks at once (and a second checkout on
the same machine would recompile it into the same cache while the first one loads it). Build it
once, here, into an extensions folder private to this virtual environment, before any test runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The suite runs on CPU/gloo on every machine, GPU nodes included: its multi-rank tests start 2 ranks
# on one host, which nccl cannot place on one GPU, and CI has none. tests/test_cuda.py opts back in
# (with the devices saved here) for the checks that need a GPU.
GPU_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["DS_ACCELERATOR"] = "cpu"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def pytest_sessionstart(session) -> None:
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "b is not None and b.is_compatible() and b.load()\n")
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=600)
