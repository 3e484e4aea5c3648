"""`s3dist eval` and `s3dist sweep`: evaluate a run's newest checkpoint or an export, outside training.

The model is loaded with ep_size=1 (a checkpoint's experts are consolidated), so the commands run as one
process or under `accelerate launch` (each rank extracts its part of every split, rank 0 fits the probes).
An evaluation written into a run directory holds that directory's run lock (`s3dist.runlock`), as a
training job does. `sweep` over several runs aggregates their evaluations (`s3dist.seeds`).
"""

from __future__ import annotations

import json
from pathlib import Path

from s3dist import rundir
from s3dist.config import ConfigError, RunConfig
from s3dist.evaluate import evaluate_run
from s3dist.outputs import check_folder

# Keys an evaluation may change: they decide how representations are extracted and probed, never the
# weights' shapes.
EVAL_OVERRIDE_PREFIXES = ("data.eval_batch_size", "data.prefetch", "data.read_threads", "data.nonfinite", "eval.",
                          "stages.keep_fraction", "stages.prune_")


def apply_eval_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`KEY=VALUE` evaluation settings on top of the run's config; other keys are refused by name."""
    from s3dist.config import _apply, _nest, parse_overrides, validate

    dotted = parse_overrides(overrides)
    bad = [k for k in dotted if not k.startswith(EVAL_OVERRIDE_PREFIXES)]
    if bad:
        raise ConfigError(f"evaluation cannot override {bad}: only keys starting with "
                          f"{list(EVAL_OVERRIDE_PREFIXES)} change how a trained model is evaluated")
    _apply(cfg, "", _nest(dotted), from_cli=True)
    validate(cfg)
    return cfg


def load_for_eval(run: Path | None, model_file: Path | None, data_path: str | None = None):
    """(cfg, model, data_url, step) from a run's newest checkpoint, an exported folder or an exported safetensors
    file; step is the checkpoint's global step (0 for an export, which does not record it)."""
    from s3dist import checkpoint as ckpt_io
    from s3dist.export import load_export
    from s3dist.config import from_dict, to_dict
    from s3dist.data.manifest import read_manifest
    from s3dist.model.encoder import S3Encoder

    if model_file is not None and Path(model_file).is_dir():
        # An exported folder records its run config and where the training data was (or says which --data)
        from s3dist.pretrained import S3Encoder as Pretrained

        model = Pretrained.from_pretrained(model_file)
        data_url = model.data_url(data_path, what=f"'{model_file}'")
        model.check_manifest(read_manifest(data_url, recorded_by=None if data_path else f"'{model_file}'"), data_url)
        return from_dict(to_dict(model.run_config)), model, data_url, 0  # a copy: eval overrides stay off the model
    step = 0
    if model_file is not None:
        cfg_dict, state = load_export(model_file)
    else:
        ck = ckpt_io.find_latest(run)
        if ck is None:
            raise ckpt_io.CheckpointError(f"no complete checkpoint in '{run}/checkpoints'; train first or pass --model")
        meta = ckpt_io.read_meta(ck)
        cfg_dict, step = meta["config"], meta["state"]["global_step"]
        state = ckpt_io.consolidated_state_dict(ck)
    cfg = from_dict(cfg_dict)
    if not (data_path or cfg.data.path or run):
        raise ConfigError(f"'{model_file}' was trained on the embedded synthetic data set, which is not part of an "
                          f"export: pass --data RUN_DIR/data (the run directory it was exported from)")
    data_url = data_path or cfg.data.path or str(run / "data")
    manifest = read_manifest(data_url, recorded_by=None if data_path else f"'{model_file or run}'")
    mods = cfg.data.modalities or list(manifest.modalities)
    model = S3Encoder({m: manifest.modalities[m].shape[-1] for m in mods}, cfg.model, cfg.moe, ep_size=1, ep_rank=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ckpt_io.CheckpointError(f"weights do not fit the model built from the saved config: missing "
                                      f"{missing[:5]}, unexpected {unexpected[:5]}")
    return cfg, model, data_url, step


def _cli_eval(args) -> int:
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims

    ps = _keep_fractions_arg(args)  # before anything loads: a typo costs nothing
    out = getattr(args, "out", None)
    if out is not None:
        check_folder(out, "--out")
        if rundir.holds_run(out) and (args.run is None or out.resolve() != Path(args.run).resolve()):
            # its eval.json is that run's evaluation, which export and the model card read as the run's own
            raise ConfigError(f"--out {out} is another run's directory, and its eval.json is that run's evaluation: "
                              f"write this one elsewhere (--out DIR)")
    cfg, model, data_url, step = load_for_eval(args.run, args.model, args.data)
    apply_eval_overrides(cfg, args.overrides)
    dims = make_dims(*init_distributed(cfg.dist), 1)
    attach_expert_groups(model, dims)
    # an export folder holds its own evaluation; a single-file export's go next to the file
    out_dir = getattr(args, "out", None) or args.run or (args.model if args.model.is_dir() else args.model.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    holds_run = rundir.holds_run(out_dir)
    if holds_run:  # a run directory: a job may be training in it, and writes its own eval.json at the end
        _lock_run_dir(out_dir, cfg, dims.rank == 0)
    try:
        return _evaluate_into(out_dir, cfg, dims, model, data_url, step, ps)
    finally:
        if holds_run:
            from s3dist import runlock

            runlock.release(out_dir)


def _lock_run_dir(run_dir: Path, cfg: RunConfig, is_main: bool) -> None:
    """Hold the run directory's lock (`s3dist.runlock`) while the evaluation writes into it, as a training job
    does: an evaluation of a run that is still training is refused, naming the job, rather than writing beside
    it (its own final evaluation would replace this one, from another checkpoint)."""
    from s3dist import runlock

    try:
        runlock.acquire_collective(run_dir, cfg.checkpoint.lock_stale_s, is_main)
    except runlock.RunLockError as e:
        raise runlock.RunLockError(f"{e}. To evaluate its newest checkpoint now, write the evaluation elsewhere: "
                                   f"--out DIR") from None


def _evaluate_into(out_dir: Path, cfg: RunConfig, dims, model, data_url: str, step: int, ps) -> int:
    if ps is not None and (out_dir / "eval.json").exists():
        # extend the evaluation there rather than replace it: its p's are evaluated again with the new ones, so
        # the file stays one evaluation (one checkpoint, one set of settings) and keeps the thresholds an
        # export reads for those p's
        ps = sorted(set(ps) | {r["keep_fraction"] for r in json.loads((out_dir / "eval.json").read_text())["sweep"]})
    res = evaluate_run(cfg, dims, out_dir, model, data_url, None, step=step, keep_fractions=ps)
    if res is not None:  # rank 0 (under accelerate launch every rank evaluates its part)
        print(json.dumps({k: res[k] for k in ("probe_accuracy", "best_keep_fraction", "best_accuracy")}, indent=1))
    return 0


def _keep_fractions_arg(args) -> list[float] | None:
    """--keep-fraction P / --keep-fractions P,P,... as floats in [0, 1] (None: the run's configured sweep)."""
    flag, text = "--keep-fractions", getattr(args, "keep_fractions", None)
    if text is None and getattr(args, "keep_fraction", None) is not None:
        flag, text = "--keep-fraction", str(args.keep_fraction)
    if text is None:
        return None
    ps = []
    for item in text.split(","):
        try:
            p = float(item)
        except ValueError:
            p = float("nan")
        if not 0.0 <= p <= 1.0:  # also NaN and an empty item
            raise ConfigError(f"{flag} {text!r}: {item.strip()!r} is not a keep fraction; give numbers in [0, 1], "
                              f"comma-separated, e.g. 0,0.1,0.3,1.0")
        ps.append(p)
    return ps


def _cli_sweep(args) -> int:
    # `--run A B key=value`: argparse's greedy --run list swallows the overrides; they are the items with '='
    args.overrides = list(args.overrides) + [str(r) for r in args.run if "=" in str(r)]
    args.run = [r for r in args.run if "=" not in str(r)]
    if len(args.run) > 1:
        if args.out is not None:
            check_folder(args.out, "--out")
        if args.keep_fractions or args.overrides:
            raise ConfigError("several runs are aggregated from their own eval.json, so --keep-fractions and "
                              "KEY=VALUE settings do not apply: sweep each run first (s3dist sweep --run RUN ...)")
        if len({r.resolve() for r in args.run}) < len(args.run):
            raise ConfigError(f"a run is given twice in --run {' '.join(map(str, args.run))}; give each once")
        from s3dist.seeds import aggregate_seeds

        res = aggregate_seeds(args.run, args.out or args.run[0].parent)
        for r in res["sweep"]:
            print(f"p={r['keep_fraction']:.2f}  acc={100 * r['accuracy']:.2f} ± {100 * r['std']:.2f}  (n={r['n']})")
        return 0
    args.run = args.run[0]
    args.model = None
    return _cli_eval(args)


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    if name == "eval":
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--run", type=Path, help="run directory (newest checkpoint is used)")
        src.add_argument("--model", type=Path, help="an export (s3dist export): its folder, or a .safetensors file")
        p.add_argument("--keep-fraction", type=float, help="one keep fraction p in [0, 1]")
        p.set_defaults(func=_cli_eval)
    else:
        p.add_argument("--run", type=Path, nargs="+", required=True,
                       help="run directory; several runs (seeds) are aggregated into mean ± std")
        p.add_argument("--keep-fractions", help="comma-separated list, e.g. 0,0.1,0.3,1.0")
        p.set_defaults(func=_cli_sweep)
    p.add_argument("--out", type=Path, help="where the outputs go: eval.json, sweep.csv/png of one run (default: "
                                            "the run directory, or the exported file's folder), or "
                                            "sweep_seeds.json/png of several (default: the first run's parent "
                                            "folder)")
    p.add_argument("--data", help="data set URL (default: the run's)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"evaluation settings, e.g. data.eval_batch_size=32 stages.prune_threshold=batch (keys "
                        f"starting with {', '.join(EVAL_OVERRIDE_PREFIXES)})")
