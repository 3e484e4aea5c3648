"""What a run directory is: the folder one training job owns, and when a new command may (re)start in it.

A run directory holds the run's resolved `config.yaml` (written by rank 0 once the job holds the
directory's lock, `s3dist.runlock`), its checkpoints, metrics and evaluation. "Holds a run" means "has the
config.yaml s3dist writes": training refuses to start over such a directory unless it never reached a step,
and an evaluation that writes into one takes the run lock first (`s3dist.eval_cli`). A folder with some
other config.yaml (a recipe kept there) is not a run, and training refuses it rather than clear it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import yaml

from s3dist.config import RUN_CONFIG_HEADER, ConfigError, RunConfig
from s3dist.outputs import check_folder

log = logging.getLogger("s3dist")

CONFIG_FILE = "config.yaml"


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


# Top-level keys of every config.yaml s3dist has written, headed or not (runs from before the header)
_RUN_CONFIG_KEYS = {"output_dir", "resume", "overwrite", "model", "moe", "data", "stages", "dist"}


def holds_run(path: Path) -> bool:
    """Whether `path` is a run directory (a training job has started in it): its config.yaml is one s3dist
    wrote, not a recipe that happens to be named so."""
    f = config_path(path)
    if not f.is_file():
        return False
    text = f.read_text(errors="replace")
    if text.startswith(RUN_CONFIG_HEADER):
        return True
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and _RUN_CONFIG_KEYS <= doc.keys()


def _refuse_what_is_not_ours(run_dir: Path, cfg: RunConfig, started: bool) -> None:
    """Files a run would replace or clear that s3dist did not write are refused by name, before anything is."""
    if config_path(run_dir).exists() and not started:
        raise ConfigError(f"output_dir '{run_dir}' has a {CONFIG_FILE} that s3dist did not write (a recipe?), and a "
                          f"run writes its own there: choose another --output_dir, or keep recipes outside run "
                          f"directories (--config PATH)")
    data = run_dir / "data"
    if not cfg.data.path and data.is_dir() and any(data.iterdir()) and not (data / "manifest.json").exists():
        raise ConfigError(f"output_dir '{run_dir}' has a folder data/ that is not an s3dist data set, where the run "
                          f"writes its embedded synthetic data set: choose another --output_dir, or move data/ "
                          f"(or give data.path)")


def resolve_run_dir(cfg: RunConfig, is_main: bool) -> Path:
    """The output directory, identical on every rank, held by this job; refuses to clobber another run.

    Rank 0 takes the directory's run lock (`s3dist.runlock`) before anything is written in it and
    holds it until `run` ends; when another live job holds it, every rank raises RunLockError.
    """
    import torch.distributed as dist

    from s3dist import checkpoint as ckpt_io
    from s3dist import runlock

    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    else:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(stamp, src=0)  # ranks could straddle a second boundary
        run_dir = Path("runs") / f"{cfg.name}-{stamp[0]}"
    check_folder(run_dir, "output_dir")
    runlock.acquire_collective(run_dir, cfg.checkpoint.lock_stale_s, is_main)
    started = holds_run(run_dir)
    _refuse_what_is_not_ours(run_dir, cfg, started)
    # An earlier start that stopped before its first logged step or checkpoint (bad data, a tracker without its
    # API key, a kill during start-up) left only what the command recreates: starting again needs no flag.
    trained = started and (ckpt_io.find_latest(run_dir) is not None or _has_rows(run_dir / "metrics.jsonl"))
    if trained and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output_dir '{run_dir}' already holds a run (config.yaml, and checkpoints or logged "
                          f"steps). Continue it with --resume auto, start over with --overwrite, or pick another "
                          f"--output_dir")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if started and not trained and not cfg.resume and not cfg.overwrite:
            log.info("output_dir %s holds a start that never reached a step: starting over in it", run_dir)
        if started and not cfg.resume and (cfg.overwrite or not trained):
            import shutil

            # checkpoints/ without a complete checkpoint is left alone: it can only hold a cut-short save (pruned
            # later) or checkpoints an earlier resume set aside, which are kept until --overwrite
            for sub in ("checkpoints", "tb", "samples") if cfg.overwrite else ("tb", "samples"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            for f in ("metrics.jsonl", "eval.json", "ranks.jsonl"):
                (run_dir / f).unlink(missing_ok=True)
    return run_dir


def _has_rows(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0
