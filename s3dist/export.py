"""`s3dist export`: a run's newest checkpoint as something that loads without DeepSpeed or ranks.

A folder (`config.json`, `model.safetensors` with every expert by global index, a model card `README.md`)
that `s3dist.S3Encoder.from_pretrained` loads in any process (`s3dist.pretrained`), or, for an `--out`
ending in `.safetensors`, one file of weights with the run config in its metadata. Both are written
beside their destination and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import s3dist
from s3dist.checkpoint import CheckpointError, consolidated_state_dict, find_latest, read_meta
from s3dist.outputs import check_output_file, check_output_folder


def export(run_dir: Path, out: Path) -> Path:
    """The run's newest checkpoint as a folder (config.json, model.safetensors with every expert, model card
    README.md; see `s3dist.pretrained`), or as one safetensors file when `out` ends in `.safetensors`."""
    if out.suffix == ".safetensors":
        return export_file(run_dir, out)
    return export_folder(run_dir, out)


def export_folder(run_dir: Path, out: Path) -> Path:
    """Written next to `out` and renamed into place, so a failed export leaves no half-written folder; an
    existing export (or an empty folder) at `out` is replaced, anything else refused."""
    from s3dist.pretrained import S3Encoder

    check_output_folder(out, "--out", ours=_is_export_folder, kind="an s3dist export folder")
    encoder = S3Encoder.from_run(run_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _is_export_folder(path: Path) -> bool:
    try:
        conf = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(conf, dict) and "s3dist_version" in conf and "run_config" in conf


def export_file(run_dir: Path, out_file: Path) -> Path:
    """One safetensors file with every expert and the config: loadable without DeepSpeed or ranks. An existing
    export at `out_file` is replaced, any other file refused."""
    from safetensors.torch import save_file

    from s3dist.pretrained import shareable

    check_output_file(out_file, "--out", ours=_is_export_file, kind="an s3dist export", example="model.safetensors")
    ckpt = find_latest(run_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under '{run_dir / 'checkpoints'}'")
    meta = read_meta(ckpt)
    tensors = consolidated_state_dict(ckpt)
    out_file.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to write
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"s3dist_config": json.dumps(meta["config"]),
                                           "s3dist_version": s3dist.__version__, "checkpoint": ckpt.name})
    shareable(tmp)
    os.replace(tmp, out_file)
    return out_file


def _export_metadata(path: Path) -> dict | None:
    """The safetensors metadata of an s3dist export file; None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except SafetensorError:  # not a safetensors file; a missing path keeps its FileNotFoundError
        return None
    return meta if meta and "s3dist_config" in meta else None


def _is_export_file(path: Path) -> bool:
    return _export_metadata(path) is not None


def load_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(run config, tensors) of a one-file export; CheckpointError naming `path` for any other file."""
    from safetensors.torch import load_file

    meta = _export_metadata(path)
    if meta is None:
        raise CheckpointError(f"'{path}' is not an s3dist export (a .safetensors file written by `s3dist export`, "
                              f"with s3dist_config in its metadata)")
    return json.loads(meta["s3dist_config"]), load_file(str(path))


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run", required=True, type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (config.json, model.safetensors, README.md: load it with "
                        "s3dist.S3Encoder.from_pretrained), or a path ending in .safetensors for one file")
    p.set_defaults(func=_cli_export)


def _cli_export(args) -> int:
    print(export(args.run, args.out))
    return 0
