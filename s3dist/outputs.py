"""Where a command writes: the checks made before any work starts.

A typed-wrong destination (a file where a folder is meant, a folder under a file) is refused by name before
a model is loaded or a rank starts, instead of failing after the work with an OS traceback. And a command
only ever replaces what it wrote itself: `s3dist export` replaces an earlier export (folder or
`.safetensors` file), `s3dist embed --out emb.parquet` an earlier embedding, but neither replaces any other
file or folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from s3dist.config import ConfigError


def check_folder(path: Path, flag: str) -> None:
    """`path` is, or can be created as, a folder: it is not a file and no folder above it is a file."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    _check_parents(path, flag)


def _check_parents(path: Path, flag: str) -> None:
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{flag} {path} cannot be written: '{blocker}' is a file, not a folder; choose another "
                          f"{flag}")


def check_output_folder(path: Path, flag: str, *, ours: Callable[[Path], bool], kind: str) -> None:
    """`path` can be written as one folder: nothing is there, an empty folder, or `kind`, which `ours(path)`
    recognises; anything else (a file, another folder) is left alone."""
    check_folder(path, flag)
    if path.is_dir() and any(path.iterdir()) and not ours(path):
        raise ConfigError(f"{flag} {path} exists and is not {kind}, so it was left alone; choose another {flag}")


def check_output_file(path: Path, flag: str, *, ours: Callable[[Path], bool], kind: str, example: str) -> None:
    """`path` can be written as one file: not a folder, its parent can be a folder, and what is there already
    (if anything) is `kind`, which `ours(path)` recognises; anything else is left alone. `example`: a file name
    to suggest when `path` is a folder."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give the file to write, e.g. {path / example}")
    _check_parents(path, flag)
    if path.exists() and not ours(path):
        raise ConfigError(f"{flag} {path} exists and is not {kind}, so it was left alone; choose another {flag} "
                          f"or remove the file")
