"""Entry point: `accelerate launch -m s3dist.train [--config RECIPE.yaml] [key=value ...]`.

1. parse and validate the config (before any process group exists),
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
from pathlib import Path

import torch

from s3dist.config import ConfigError, RunConfig, load_config, save_config, validate_world

log = logging.getLogger("s3dist")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    p = argparse.ArgumentParser(prog="s3dist train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run recipe (YAML), e.g. launch_configs/recipes/s3_synth.yaml")
    p.add_argument("--output_dir", "--output-dir", help="run directory (default runs/<name>-<timestamp>)")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in the output dir) or a checkpoint dir")
    p.add_argument("--overwrite", action="store_true", help="start fresh in an output dir that holds a run")
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
    return args, load_config(args.config, extra)


def resolve_run_dir(cfg: RunConfig, is_main: bool) -> Path:
    """The output directory, identical on every rank, held by this job; refuses to clobber another run.

    Rank 0 takes the directory's run lock (`s3dist.runlock`) before anything is written in it and
    holds it until `run` ends; when another live job holds it, every rank raises RunLockError.
    """
    import torch.distributed as dist

    from s3dist import runlock

    if cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    else:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(stamp, src=0)  # ranks could straddle a second boundary
        run_dir = Path("runs") / f"{cfg.name}-{stamp[0]}"
    runlock.acquire_collective(run_dir, cfg.checkpoint.lock_stale_s, is_main)
    holds_run = (run_dir / "config.yaml").exists()
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output_dir '{run_dir}' already holds a run (config.yaml exists). Continue it with "
                          f"--resume auto, start over with --overwrite, or pick another --output_dir")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if holds_run and cfg.overwrite and not cfg.resume:
            import shutil

            for sub in ("checkpoints", "tb"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            for f in ("metrics.jsonl", "eval.json", "ranks.jsonl"):
                (run_dir / f).unlink(missing_ok=True)
    return run_dir


def prepare_data(cfg: RunConfig, run_dir: Path, is_main: bool) -> str:
    """URL of the data set; the embedded synthetic default is generated once, by rank 0."""
    import torch.distributed as dist

    if cfg.data.path:
        return cfg.data.path
    url = str(run_dir / "data")
    if is_main and not (run_dir / "data" / "manifest.json").exists():
        from s3dist.data.synth import generate

        generate(url, cfg.data.synth, name="synth")
    if dist.is_initialized():
        dist.barrier()
    return url


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args, cfg = parse_args(argv)
    except ConfigError as e:
        print(f"s3dist: config error: {e}", file=sys.stderr)
        return 2
    if cfg.dist.exit_with_launcher:
        from s3dist.launch import exit_with_launcher

        exit_with_launcher()  # orphaned by a killed launcher, this rank would train on (issue #19)
    from s3dist import runlock
    from s3dist.checkpoint import CheckpointError
    from s3dist.data import DataError

    try:
        run(cfg)
        return 0
    except runlock.RunLockError as e:
        print(f"s3dist: run directory busy: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"s3dist: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"s3dist: checkpoint error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"s3dist: data error: {e}", file=sys.stderr)
        return 2
    finally:
        runlock.release_all()  # also on errors and on the requeue exit (SystemExit 75)


def run(cfg: RunConfig):
    """Train and evaluate one run in this process (one rank of the job). Returns the Trainer."""
    import torch.distributed as dist

    from s3dist import checkpoint as ckpt_io
    from s3dist import evaluate, runlock
    from s3dist.data.stream import ShardStream
    from s3dist.dist import init_distributed, make_dims
    from s3dist.metrics import make_logger, truncate_metrics
    from s3dist.model.encoder import S3Encoder
    from s3dist.progress import Progress
    from s3dist.trainer import PreemptionFlag, Trainer

    preempt = PreemptionFlag()  # installed before anything slow, so an early signal is not lost
    rank, local_rank, world, device, backend = init_distributed(cfg.dist)
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = resolve_run_dir(cfg, is_main)
    data_url = prepare_data(cfg, run_dir, is_main)

    stream = ShardStream(data_url, "train", batch_size=cfg.data.batch_size, rank=rank, world_size=world,
                         modalities=cfg.data.modalities or None, seed=cfg.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, drop_last=True, nonfinite=cfg.data.nonfinite,
                         prefetch=cfg.data.prefetch, read_threads=cfg.data.read_threads)
    modalities = stream.modalities
    ep = validate_world(cfg, world, len(modalities), has_concepts=bool(stream.manifest.num_concepts))
    dims = make_dims(rank, local_rank, world, device, backend, ep)
    cfg.data.modalities = list(modalities)

    resume_from = None
    if cfg.resume:
        resume_from = ckpt_io.find_latest(run_dir) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_from is None:
            log.info("--resume auto: no complete checkpoint in %s, starting fresh", run_dir)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
        if resume_from is not None:
            step = ckpt_io.read_meta(resume_from, verify=False)["state"]["global_step"]
            truncate_metrics(run_dir / "metrics.jsonl", step)
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
    logger = make_logger(run_dir, is_main, cfg.logging.tensorboard)
    progress = Progress(enabled=is_main and cfg.logging.progress and sys.stdout.isatty())
    trainer = Trainer(cfg, dims, run_dir, model, stream, logger, preempt=preempt, progress=progress)
    if is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("run dir %s | world %d = ep %d x expert-dp %d | %s | %d params on rank 0 | modalities %s",
                 run_dir, world, ep, dims.expert_dp_size, backend, n_params, modalities)
    trainer.fit(resume_from)

    if cfg.eval.run_at_end and ("sparsify" in cfg.stages.run or cfg.eval.keep_fractions):
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
