"""What a resume continues with: the run's own config, changed only where a resume may change it.

A resume (`--resume auto` or `--resume CHECKPOINT`) continues the run stored in the checkpoint, not the
command: every key the command does not give keeps the run's value (`<run>/config.yaml`, which the
checkpoint's meta repeats), whatever the defaults say now. Of the keys the command gives, only those in
RESUMABLE_KEYS may differ; any other difference is refused, naming each key and both values, unless
`--force-config`, and keys that shape the weights (SHAPE_KEYS) are refused even then. A stage's step count
may change only while that stage can still take it. Accepted changes are logged and appended to
`<run>/config_changes.jsonl`.

`s3dist.train` plans the resume twice: before any process group exists (a refused resume leaves no trace)
and again once the job holds the run directory (`plan_resume`); `Trainer.fit` checks the model shape once
more against the checkpoint it loads (`check_compatible`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from s3dist import checkpoint as ckpt_io
from s3dist.checkpoint import META, CheckpointError
from s3dist.config import (STAGE_NAMES, ConfigError, RunConfig, absolute_local_path, flatten, from_dict, iter_fields,
                           parse_overrides, to_dict, validate)

log = logging.getLogger("s3dist")


# Keys a `--resume` may change (a trailing '.' or '_' covers every key it starts). A resume continues the
# run stored in its checkpoint: every other key keeps the stored value, and a command that changes one is
# refused (`--force-config` overrides that). These change how long the run goes on, how it is watched,
# saved and evaluated, or how ranks talk; never the model, the objective or the sample order: step counts
# (the run continues to the new count), logging, checkpoint cadence and lock, evaluation, read-ahead and
# threads (the batches are the same for any value), Stage 3's settings (read only by the evaluation at the
# end, as `s3dist eval` may change them), collective timeout and backend, the expert-parallel size (experts
# are resharded by global index, the optimizer reset), whether ranks die with their launcher, and what the
# command itself says (where the run is, how it starts).
RESUMABLE_KEYS = ("stages.specialize_steps", "stages.select_steps", "logging.", "checkpoint.", "eval.",
                  "data.prefetch", "data.read_threads", "data.eval_batch_size", "stages.keep_fraction",
                  "stages.prune_", "dist.timeout_s", "dist.backend", "dist.ep_size", "dist.exit_with_launcher",
                  "output_dir", "resume", "overwrite", "name")


def resumable(key: str) -> bool:
    """May `key` (dotted) differ from the stored run's value when resuming? See RESUMABLE_KEYS."""
    return any(key == k or (k[-1] in "._" and key.startswith(k)) for k in RESUMABLE_KEYS)


# Keys that shape the weights (or what they mean): a checkpoint cannot be loaded where one differs, not
# even with --force-config.
SHAPE_KEYS = ("moe.kind", "moe.num_experts", "moe.granularity", "moe.expansion", "moe.top_k", "moe.expert_hidden",
              "moe.shared_experts", "model.arch", "model.d_model", "model.num_layers", "model.num_heads",
              "model.representation", "model.temporal", "model.tokens", "data.modalities")
# What the command does rather than what the run is: always the command's own values, never compared.
COMMAND_KEYS = ("output_dir", "resume", "overwrite")


def _describe(changes: list[tuple]) -> str:
    return "; ".join(f"{k} was {old!r} there but is {new!r} now" for k, old, new in changes)


def check_compatible(meta: dict, config: dict, ckpt: Path) -> None:
    """Refuse a resume whose model shape differs from the checkpoint's (SHAPE_KEYS)."""
    old, new = flatten(meta["config"]), flatten(config)
    differ = [(k, old.get(k), new[k]) for k in SHAPE_KEYS if old.get(k) != new[k]]
    if differ:
        raise CheckpointError(f"cannot resume from '{ckpt}': {_describe(differ)}; use the same value or start a new "
                              f"output_dir")


def resume_config(meta: dict, ckpt: Path, command, given, force: bool = False) -> tuple:
    """The config a resume from `ckpt` continues with: the run's own (the checkpoint's meta config, which is
    `<run>/config.yaml`), where the command changes only keys that may change across a resume
    (RESUMABLE_KEYS). `command` is the command's RunConfig, `given` the dotted keys it sets
    (recipe and overrides): every other key keeps the run's value, whatever the defaults say.

    Returns (config, changed, forced), the last two lists of (key, old value, new value). Any other key that
    differs is refused with a ConfigError naming every such key and both values, unless `force`
    (--force-config); keys that shape the weights (SHAPE_KEYS) are refused even then."""
    try:
        config = from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"the config stored in '{ckpt / META}' is not valid for this s3dist: {e}") from e
    config.data.path = absolute_local_path(config.data.path)  # older runs stored it as given
    old, new = flatten(to_dict(config)), flatten(to_dict(command))
    changed, refused = [], []
    for key in old:
        if key not in COMMAND_KEYS and (key not in given or new[key] == old[key]):
            continue
        if key not in COMMAND_KEYS:
            (changed if resumable(key) else refused).append((key, old[key], new[key]))
        *sections, leaf = key.split(".")
        obj = config
        for sec in sections:
            obj = getattr(obj, sec)
        setattr(obj, leaf, new[key])
    shape = [k for k, _, _ in refused if k in SHAPE_KEYS]
    if refused and (shape or not force):
        many = len(shape) > 1
        way_out = (f"or start a new --output_dir ({', '.join(shape)} shape{'' if many else 's'} the weights in the "
                   f"checkpoint: not even --force-config can change {'them' if many else 'it'})" if shape else
                   "start a new --output_dir, or pass --force-config to continue with the new values (recorded in "
                   "<run>/config_changes.jsonl)")
        raise ConfigError(f"cannot resume from '{ckpt}' with another config: {_describe(refused)}. A resume "
                          f"continues the run with its own config and may change only {_resumable_text()}. Use the "
                          f"run's values (a key left off the command keeps the run's value), {way_out}")
    _check_stage_steps(meta["state"], config.stages.run, changed, ckpt)
    validate(config)
    return config, changed, refused


STAGE_STEP_KEYS = {"stages.specialize_steps": ("specialize", "Stage 1"), "stages.select_steps": ("select", "Stage 2")}


def _check_stage_steps(state: dict, run: list[str], changed: list[tuple], ckpt: Path) -> None:
    """A stage's step count may change on a resume only while that stage can still take it: not once a later
    stage has started (its steps would be recorded but never run), and not below the steps it has already run.
    Nor may `stages.run` (changed with --force) send a resume back to a stage the checkpoint has finished: that
    would train it again on the later stage's weights, which is a new run, not this one continued."""
    names = {stage: name for stage, name in STAGE_STEP_KEYS.values()}
    trained = [s for s in run if s in names]
    at = state["stage"]
    if at in names and at not in trained:
        earlier = [s for s in trained if STAGE_NAMES.index(s) < STAGE_NAMES.index(at)]
        if earlier:
            raise ConfigError(f"stages.run = {run} cannot resume checkpoint '{ckpt.name}': it is in {names[at]} "
                              f"({at}), so {names[earlier[0]]} ({earlier[0]}) has finished, and a resume does not "
                              f"train a finished stage again on a later stage's weights. To train "
                              f"{names[earlier[0]]} longer, resume one of its checkpoints into a new --output_dir "
                              f"(--resume RUN/checkpoints/step-...-{earlier[0]}); to go on with this run, include "
                              f"{at} in stages.run")
    for key, old, new in changed:
        stage, name = STAGE_STEP_KEYS.get(key, (None, None))
        if stage not in trained or at not in trained:
            continue
        if trained.index(stage) < trained.index(at):
            raise ConfigError(f"{key} cannot change from {old} to {new} on this resume: {name} finished and "
                              f"checkpoint '{ckpt.name}' is in a later stage ({at}), so no more {name} "
                              f"steps can run. To train {name} longer, resume one of its checkpoints into a new "
                              f"--output_dir (--resume RUN/checkpoints/step-...-{stage})")
        if stage == at and new < state["stage_step"]:
            raise ConfigError(f"{key} = {new} is below the {state['stage_step']} {name} steps checkpoint "
                              f"'{ckpt.name}' has already run; give at least {state['stage_step']}")


def _resumable_text() -> str:
    return ", ".join(k + "*" if k[-1] in "._" else k for k in RESUMABLE_KEYS if k not in COMMAND_KEYS)


# ---------------------------------------------------------------------------------------------
# The command's plan: which checkpoint, and the config it continues with
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
    keys = set(parse_overrides(list(args.overrides)))
    if args.config:  # already read and validated by load_config
        keys |= set(flatten(yaml.safe_load(Path(args.config).read_text()) or {}))
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
    plan = ResumePlan(command, set(given), force)
    if command.resume == "auto":
        plan.checkpoint = ckpt_io.find_latest(run_dir) if run_dir is not None else None
    elif command.resume:
        plan.checkpoint = Path(command.resume)
        _check_explicit_checkpoint(plan.checkpoint, run_dir)
    if plan.checkpoint is None:
        return command, plan
    meta = ckpt_io.read_meta(plan.checkpoint, verify=False)  # checksums are verified once, by Trainer.fit
    cfg, plan.changed, plan.forced = resume_config(meta, plan.checkpoint, command, plan.given, force)
    return cfg, plan


def _check_explicit_checkpoint(ckpt: Path, run_dir: Path | None) -> None:
    """`--resume PATH`: PATH is a checkpoint, and one this run directory can continue. A checkpoint of another
    run (or one an earlier resume set aside) into a directory that has checkpoints of its own would write the
    two runs' steps into one line of checkpoints and metrics, so it is refused; into a new directory it is
    how a run is branched."""
    flag = f"--resume {ckpt}"
    if not ckpt.exists():
        raise FileNotFoundError(f"{flag}: no such checkpoint; give a folder RUN/checkpoints/step-..., or "
                                f"--resume auto with --output_dir RUN")
    # a folder under checkpoints/ without its meta file is a save cut short: read_meta names it later
    if not ckpt.is_dir() or not (ckpt / META).exists() and ckpt.parent.name != "checkpoints":
        newest = ckpt_io.find_latest(ckpt.parent) if ckpt.name == "checkpoints" else None
        if (ckpt / "checkpoints").is_dir():
            hint = f"it is a run directory: continue it with --output_dir {ckpt} --resume auto"
        elif newest is not None:
            hint = f"its checkpoints are the folders in it: give one, e.g. --resume {newest}"
        else:
            hint = "a checkpoint is a folder RUN/checkpoints/step-... holding s3dist_meta.json"
        raise ConfigError(f"{flag} is not a checkpoint: {hint}")
    if run_dir is None or ckpt.parent.resolve() == (run_dir / "checkpoints").resolve():
        return
    own = ckpt_io.find_latest(run_dir)
    if own is not None:
        raise ConfigError(f"{flag} is not a checkpoint of output_dir '{run_dir}', which has checkpoints of its own "
                          f"(newest {own.name}): continuing another line there would mix the two in its checkpoints "
                          f"and metrics. Resume it into a new --output_dir, or continue this run with --resume auto")


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
