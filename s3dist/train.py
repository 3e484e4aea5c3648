"""Entry point: `accelerate launch -m s3dist.train [--config RECIPE.yaml] [key=value ...]`.

1. parse and validate the config (before any process group exists); a resume continues with the run's
   own config, changed only where the command may change it (`s3dist.checkpoint.resume_config`),
2. join the process group and decide the run directory,
3. make sure the data exists (the embedded synthetic default is generated if none is given),
4. build the encoder and train Stage 1 / Stage 2 (`s3dist.trainer`),
5. evaluate: linear probe + Stage 3 sparsity sweep (`s3dist.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from s3dist.config import (ConfigError, RunConfig, absolute_local_path, iter_fields, load_config, parse_overrides,
                           save_config, validate_world)

log = logging.getLogger("s3dist")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    p = argparse.ArgumentParser(prog="s3dist train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run recipe (YAML), e.g. launch_configs/recipes/s3_synth.yaml")
    p.add_argument("--output_dir", "--output-dir", help="run directory (default runs/<name>-<timestamp>)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in the output dir) or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="start fresh in an output dir that holds a run")
    p.add_argument("--force-config", "--force_config", action="store_true",
                   help="resume even where the command changes keys a resume keeps from the run (optim.lr, ...); "
                        "the changes are recorded in <run>/config_changes.jsonl")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=8 stages.select_steps=0")
    # intermixed: `a=1 --output_dir D b=2` works in any order (SLURM scripts append options)
    args = p.parse_intermixed_args(argv)
    extra = list(args.overrides)
    if args.output_dir:
        extra.append(f"output_dir={args.output_dir}")
    if args.resume:
        extra.append(f"resume={args.resume}")
    if args.overwrite:
        extra.append("overwrite=true")
    cfg = load_config(args.config, extra)
    cfg.data.path = absolute_local_path(cfg.data.path)
    return args, cfg


# ---------------------------------------------------------------------------------------------
# Resume: the run's own config, changed only where a resume may change it
# ---------------------------------------------------------------------------------------------


@dataclass
class ResumePlan:
    """What a command continues from, and how its config differs from the run's."""

    command: RunConfig             # the command's own config (defaults < recipe < overrides)
    given: set[str]                # dotted keys the command sets (recipe and overrides)
    force: bool = False            # --force-config
    checkpoint: Path | None = None  # None: a fresh start
    changed: list = field(default_factory=list)  # (key, old, new) of keys a resume may change
    forced: list = field(default_factory=list)   # (key, old, new) taken only because of --force-config


def given_keys(args: argparse.Namespace) -> set[str]:
    """The dotted keys the command line sets: the recipe's (--config) and the overrides."""
    def leaves(doc: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in doc.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    keys = set(parse_overrides(list(args.overrides)))
    if args.config:  # already read and validated by load_config
        keys |= leaves(yaml.safe_load(Path(args.config).read_text()) or {})
    return keys


def changed_from_defaults(cfg: RunConfig) -> set[str]:
    """For `run(cfg)` called from Python: the keys set away from their defaults count as given."""
    defaults = {k: v for k, _, v in iter_fields(RunConfig())}
    return {k for k, _, v in iter_fields(cfg) if v != defaults[k]}


def plan_resume(command: RunConfig, given: set[str], force: bool,
                run_dir: Path | None) -> tuple[RunConfig, ResumePlan]:
    """The config this command runs with, and the checkpoint it resumes (None: fresh start, the command's
    config as it is). Raises ConfigError when the command changes a key a resume keeps, CheckpointError
    when an explicit checkpoint is incomplete."""
    from s3dist import checkpoint as ckpt_io

    plan = ResumePlan(command, set(given), force)
    if command.resume == "auto":
        plan.checkpoint = ckpt_io.find_latest(run_dir) if run_dir is not None else None
    elif command.resume:
        plan.checkpoint = Path(command.resume)
    if plan.checkpoint is None:
        return command, plan
    meta = ckpt_io.read_meta(plan.checkpoint, verify=False)  # checksums are verified once, by Trainer.fit
    cfg, plan.changed, plan.forced = ckpt_io.resume_config(meta, plan.checkpoint, command, plan.given, force)
    return cfg, plan


def record_config_changes(run_dir: Path, plan: ResumePlan) -> None:
    """Log what this resume changed; append it to <run>/config_changes.jsonl (rank 0, lock held)."""
    if not plan.changed and not plan.forced:
        return
    for key, old, new in plan.changed:
        log.info("resume: %s %r -> %r", key, old, new)
    if plan.forced:
        log.warning("resume with --force-config: %s differ from the run's config and are used anyway; recorded in %s",
                    ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in plan.forced),
                    run_dir / "config_changes.jsonl")
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": plan.checkpoint.name,
           "changed": [{"key": k, "old": old, "new": new} for k, old, new in plan.changed],
           "forced": [{"key": k, "old": old, "new": new} for k, old, new in plan.forced]}
    with open(run_dir / "config_changes.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


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
    runlock.acquire_collective(run_dir, cfg.checkpoint.lock_stale_s, is_main)
    started = (run_dir / "config.yaml").exists()
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


def prepare_data(cfg: RunConfig, run_dir: Path, is_main: bool, fresh: bool) -> str:
    """URL of the data set. The embedded synthetic default is generated by rank 0 at every fresh start (a few
    seconds), and reused only by a resume: a set left by an attempt that failed, or by the run an --overwrite
    replaces, may have been made from other `data.synth` values."""
    import torch.distributed as dist

    if cfg.data.path:
        return cfg.data.path
    url = str(run_dir / "data")
    if is_main and (fresh or not (run_dir / "data" / "manifest.json").exists()):
        from s3dist.data.synth import generate

        generate(url, cfg.data.synth, name="synth", overwrite=True)
    if dist.is_initialized():
        dist.barrier()
    return url


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from s3dist import runlock

    try:
        args, cfg = parse_args(argv)
        # before any process group exists and before anything is written: a refused resume leaves no trace
        cfg, plan = plan_resume(cfg, given_keys(args), args.force_config,
                                Path(cfg.output_dir) if cfg.output_dir else None)
        if cfg.dist.exit_with_launcher:
            from s3dist.launch import exit_with_launcher

            exit_with_launcher()  # orphaned by a killed launcher, this rank would train on (issue #19)
        run(cfg, plan)
        return 0
    except Exception as e:
        if _lost_a_peer(e):
            # The traceback would only show where this rank waited; the launcher's report names the rank that
            # failed first, and that rank's own error says why.
            print(f"s3dist: rank {os.environ.get('RANK', '0')} stops: a collective failed because another rank "
                  f"is gone or stalled past dist.timeout_s ({str(e).splitlines()[0][:300]}). The launcher's "
                  f"report names the rank that failed first; once that is fixed, continue the run with "
                  f"--resume auto", file=sys.stderr)
            return 1
        kind = _user_error(e)
        if kind is None:
            raise
        print(f"s3dist: {kind}: {e}", file=sys.stderr)
        return 2
    finally:
        runlock.release_all()  # also on errors and on the requeue exit (SystemExit 75)


def _lost_a_peer(e: Exception) -> bool:
    """A collective that failed because another rank died or stalled. gloo's transport errors reach Python as
    a plain RuntimeError naming gloo's transport; nccl's as a DistBackendError naming the remote side or a
    timeout. Anything else (a bug, a bad port) keeps its traceback."""
    import torch.distributed as dist

    text = str(e).lower()
    if isinstance(e, dist.DistBackendError):
        return "remote" in text or "timed out" in text or "timeout" in text
    return isinstance(e, RuntimeError) and "gloo/transport" in text and ("by peer" in text or "timed out" in text)


def _user_error(e: Exception) -> str | None:
    """What kind of error a user can fix `e` is (bad config, checkpoint or data, a run directory another job
    holds): `main` reports those as one line and exit code 2, without a traceback. None: a bug, re-raised."""
    from s3dist.checkpoint import CheckpointError
    from s3dist.data import DataError
    from s3dist.runlock import RunLockError

    kinds = ((ConfigError, "config error"), (CheckpointError, "checkpoint error"), (DataError, "data error"),
             (RunLockError, "run directory busy"))
    return next((kind for cls, kind in kinds if isinstance(e, cls)), None)


def evaluates_at_end(cfg: RunConfig) -> bool:
    return cfg.eval.run_at_end and bool("sparsify" in cfg.stages.run or cfg.eval.keep_fractions)


def run(cfg: RunConfig, plan: ResumePlan | None = None):
    """Train and evaluate one run in this process (one rank of the job). Returns the Trainer.

    `plan` comes from `plan_resume` (`main` makes it from the command line); without one, a `cfg` that
    resumes is the command and its keys away from the defaults are the ones it gives."""
    import torch.distributed as dist

    from s3dist import checkpoint as ckpt_io
    from s3dist import evaluate, runlock
    from s3dist.data.stream import ShardStream
    from s3dist.data.validate import check_eval_splits
    from s3dist.dist import init_distributed, make_dims
    from s3dist.config import to_dict
    from s3dist.metrics import make_logger, truncate_metrics
    from s3dist.model.encoder import S3Encoder
    from s3dist.progress import Progress
    from s3dist.trainer import PreemptionFlag, Trainer

    preempt = PreemptionFlag()  # installed before anything slow, so an early signal is not lost
    if plan is None:
        cfg, plan = plan_resume(cfg, changed_from_defaults(cfg), False,
                                Path(cfg.output_dir) if cfg.output_dir else None)
    rank, local_rank, world, device, backend = init_distributed(cfg.dist)
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = resolve_run_dir(cfg, is_main)
    # The lock is held now, so no job publishes checkpoints here: every rank finds the same one, which is the
    # one planned before the lock unless a job that has since died published another in between.
    cfg, plan = plan_resume(plan.command, plan.given, plan.force, run_dir)
    resume_from = plan.checkpoint
    if cfg.resume and resume_from is None:
        log.info("--resume %s: no complete checkpoint in %s, starting fresh", cfg.resume, run_dir)
    if is_main and resume_from is not None:
        ckpt_io.set_aside_later_checkpoints(run_dir, resume_from)
    data_url = prepare_data(cfg, run_dir, is_main, fresh=resume_from is None)

    stream = ShardStream(data_url, "train", batch_size=cfg.data.batch_size, rank=rank, world_size=world,
                         modalities=cfg.data.modalities or None, seed=cfg.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, drop_last=True, nonfinite=cfg.data.nonfinite,
                         prefetch=cfg.data.prefetch, read_threads=cfg.data.read_threads,
                         partitions=cfg.data.partitions)
    modalities = stream.modalities
    if evaluates_at_end(cfg):
        check_eval_splits(data_url, stream.manifest, modalities, cfg.data.nonfinite)
    ep = validate_world(cfg, world, len(modalities), has_concepts=bool(stream.manifest.num_concepts))
    dims = make_dims(rank, local_rank, world, device, backend, ep)
    cfg.data.modalities = list(modalities)

    if is_main:
        save_config(cfg, run_dir / "config.yaml")
        if resume_from is not None:
            record_config_changes(run_dir, plan)
        # rows logged after the checkpoint (all of them when no checkpoint was reached) are logged again
        step = ckpt_io.read_meta(resume_from, verify=False)["state"]["global_step"] if resume_from is not None else 0
        truncate_metrics(run_dir / "metrics.jsonl", step)
        for samples in sorted((run_dir / "samples").glob("rank*.jsonl")):  # logging.sample_ids
            truncate_metrics(samples, step)
    with open(run_dir / "ranks.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "hostname": socket.gethostname(), "local_rank": local_rank,
                            "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
                            "ep_rank": dims.ep_rank, "pid": os.getpid(), "device": str(device),
                            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                            "backend": backend, "dtype": cfg.dist.dtype}) + "\n")

    torch.manual_seed(cfg.seed)  # dense init identical on all ranks; experts seed themselves by index
    dims_in = {m: stream.manifest.modalities[m].shape[-1] for m in modalities}
    model = S3Encoder(dims_in, cfg.model, cfg.moe, ep_size=ep, ep_rank=dims.ep_rank).to(device)
    torch.manual_seed(cfg.seed + 1000 * rank)  # per-rank augmentation / jitter noise
    logger = make_logger(run_dir, is_main, cfg.logging, run_config=to_dict(cfg))
    progress = Progress(enabled=is_main and cfg.logging.progress and sys.stdout.isatty())
    trainer = Trainer(cfg, dims, run_dir, model, stream, logger, preempt=preempt, progress=progress)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("run dir %s | world %d = ep %d x expert-dp %d | %s | %d params on rank 0 | modalities %s",
                 run_dir, world, ep, dims.expert_dp_size, backend, n_params, modalities)
    trainer.fit(resume_from)

    if evaluates_at_end(cfg):
        evaluate.evaluate_run(cfg, dims, run_dir, model, data_url, logger, step=trainer.state.global_step)
    logger.close()
    if dist.is_initialized():
        dist.barrier()
    runlock.release(run_dir)  # every rank is done writing
    if is_main:
        log.info("done: %s", run_dir)
    return trainer


if __name__ == "__main__":
    sys.exit(main())
