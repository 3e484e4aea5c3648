"""How an s3dist command ends on an error: one line for what the user can act on, a traceback for a bug.

Every command (training, `eval` / `sweep`, `export`, `embed`, `data ...`, `config show`) ends the same way:

* bad input - a config key or value, a data set, a checkpoint, a run directory another job holds, a path
  typed wrong - prints one line `PROG: KIND: message` and exits 2. The message already names the file,
  field or value and what to do; a traceback would only bury it.
* a collective that failed because another rank died or stalled prints one line and exits 1. This rank's
  traceback would only show where it waited; the launcher's report names the rank that failed first, and
  that rank's own error says why.
* anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable


def user_error_kind(e: BaseException) -> str | None:
    """What kind of error a user can fix `e` is, as the one-line report names it; None for anything else."""
    from s3dist.checkpoint import CheckpointError
    from s3dist.config import ConfigError
    from s3dist.data import DataError
    from s3dist.runlock import RunLockError

    kinds = ((ConfigError, "config error"), (CheckpointError, "checkpoint error"), (DataError, "data error"),
             (RunLockError, "run directory busy"), (FileNotFoundError, "not found"))
    return next((kind for cls, kind in kinds if isinstance(e, cls)), None)


def lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another rank died or stalled. gloo's transport errors reach Python as
    a plain RuntimeError naming gloo's transport; nccl's as a DistBackendError naming the remote side or a
    timeout. Anything else (a shape bug, a port in use) is not matched and keeps its traceback."""
    import torch.distributed as dist

    text = str(e).lower()
    if isinstance(e, dist.DistBackendError):
        return "remote" in text or "timed out" in text or "timeout" in text
    return isinstance(e, RuntimeError) and "gloo/transport" in text and ("by peer" in text or "timed out" in text)


def report(e: BaseException, prog: str, again: str = "run the command again") -> int | None:
    """Print `e`'s one-line report on stderr and return the exit code, or None when `e` is a bug that the
    caller re-raises. `again`: what to do once a lost peer's cause is fixed."""
    if lost_a_peer(e):
        print(f"{prog}: rank {os.environ.get('RANK', '0')} stops: a collective failed because another rank is "
              f"gone or stalled past dist.timeout_s ({str(e).splitlines()[0][:300]}). The launcher's report names "
              f"the rank that failed first; once that is fixed, {again}", file=sys.stderr)
        return 1
    kind = user_error_kind(e)
    if kind is None:
        return None
    print(f"{prog}: {kind}: {e}", file=sys.stderr)
    return 2


def run(command: Callable[..., int | None], *args, prog: str, again: str = "run the command again") -> int:
    """`command(*args)`'s exit code, with the errors above reported as they say."""
    try:
        return int(command(*args) or 0)
    except Exception as e:
        code = report(e, prog, again)
        if code is None:
            raise
        return code
