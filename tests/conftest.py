"""Session set-up shared by every test tier.

DeepSpeed JIT-compiles a small CPU communication op the first time a process group starts. Built
lazily, the first multi-rank test would compile it in both ranks at once (and a second checkout on
the same machine would recompile it into the same cache while the first one loads it). Build it
once, here, into an extensions folder private to this virtual environment, before any test runs.

`reference_run`: the one real 2-rank training run (tests/launching.py REFERENCE) that several slow test
modules share instead of each training its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The run directory of tests/launching.py REFERENCE, trained once per session by `accelerate launch` (its
    console output is in the sibling file launch.stderr). Read-only: a test that writes into a run directory
    copies this one to its tmp_path first; a write into it fails the session at the end."""
    from tests import launching

    out = tmp_path_factory.mktemp("reference") / "run"
    p = launching.run(out, launching.REFERENCE)
    (out.parent / "launch.stderr").write_text(p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    before = _listing(out)
    yield out
    assert _listing(out) == before, f"a test wrote into the shared reference run {out}: copy it to tmp_path first"


def _listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(run_dir)): (f.stat().st_size, f.stat().st_mtime_ns) for f in run_dir.rglob("*")}
