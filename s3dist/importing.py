"""Keep a module that a dependency imports, and s3dist never uses, from being imported.

A rank starts by importing torch, DeepSpeed and what they pull in; on a 2-core CPU that is most of a
short job's wall time. `import deepspeed` also imports mlflow when it is installed, for DeepSpeed's
autotuner, which s3dist never runs (its cost per rank: BENCHMARKS.md "Rank start-up").
DeepSpeed catches the ImportError and goes on without it, so making that one import fail while
DeepSpeed is imported is all it takes. mlflow stays importable afterwards: the mlflow tracker
(`logging.mlflow`) imports it as usual.

(DeepSpeed's Muon optimizer costs as much again, compiling its kernels on import, but ZeRO 1/2 import
it unconditionally in their gradient reduction, so it cannot be left out the same way.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

MLFLOW = "mlflow"


@contextlib.contextmanager
def unimportable(name: str) -> Iterator[None]:
    """Inside the block `import name` raises ImportError, unless it was imported before."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # the import system's own "not importable" marker
    try:
        yield
    finally:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
