"""Checkpoint I/O: atomic DeepSpeed checkpoints plus s3dist's own state, resume lookup, export.

Layout under `<run>/checkpoints/`:
    step-00000050/                    one complete checkpoint (DeepSpeed files, one per expert, +):
        s3dist_rank{r}.pt             per-rank state: RNG states, data-stream position (weights-only)
        s3dist_meta.json              stage, steps, config, version, sha256 of every file
    latest                            name of the newest complete checkpoint (moved last, atomically)

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` only after every rank finished
and the checksums are recorded, so a crash mid-save (or a full disk) leaves the previous checkpoint
and `latest` untouched. The directory must be on a file system every rank sees (as DeepSpeed's own
multi-node checkpointing requires).

Export (`s3dist export`) writes the newest checkpoint as a Hugging Face-style folder that
`s3dist.S3Encoder.from_pretrained` loads in any process (`s3dist.pretrained`), or, for an `--out`
ending in `.safetensors`, as one file of weights plus the run config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import s3dist
from s3dist.config import check_safe_name, flatten

log = logging.getLogger("s3dist")

META = "s3dist_meta.json"
LATEST = "latest"
# How parameters are held (`s3dist.model.stacked`), per layout version:
PARAM_LAYOUTS = {
    0: "one parameter per expert and per-modality modules",            # written without a layout key
    1: "stacked experts and per-modality modules",                     # written with expert_layout=stacked
    2: "stacked experts and stacked per-modality parameters (norms, attention, routers)",
}
PARAM_LAYOUT = 2
# The module weights are saved per expert and per modality in every layout, but ZeRO's optimizer state
# (fp32 master weights, Adam moments) is one flat buffer in parameter order, so it only loads into the
# layout that wrote it.


def param_layout(meta: dict) -> int:
    return meta.get("param_layout", 1 if meta.get("expert_layout") == "stacked" else 0)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file."""


@dataclass
class TrainState:
    """Where training is: restored on resume."""

    stage: str            # stage being trained
    stage_step: int       # optimizer steps done in that stage
    global_step: int      # optimizer steps done over all stages
    stage_done: bool      # the stage finished (resume starts the next one)
    skipped_steps: int = 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return {"torch": state["torch"], "cuda": state.get("cuda"),
            # numpy / python states as plain lists so weights_only loading accepts them
            "numpy": [state["numpy"][0], torch.from_numpy(state["numpy"][1].astype(np.int64)), *state["numpy"][2:]],
            "python": [state["python"][0], list(state["python"][1]), state["python"][2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def tag_for(global_step: int, stage: str) -> str:
    return f"step-{global_step:08d}-{stage}"


def save(engine, run_dir: Path, state: TrainState, config: dict, stream_state: dict, keep_last: int,
         extra: dict | None = None) -> Path:
    """Write a checkpoint collectively (every rank calls this). Returns the published directory."""
    root = run_dir / "checkpoints"
    tag = tag_for(state.global_step, state.stage)
    check_safe_name("checkpoint tag", tag)
    tmp_tag = f".tmp-{tag}"
    if _rank() == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    client = {"s3dist_state": vars(state)}
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False)
    torch.save({"rng": rng_state(), "stream": stream_state, "state": vars(state), "extra": extra or {}},
               root / tmp_tag / f"s3dist_rank{_rank()}.pt")
    _barrier()  # every rank's files are on disk
    if _rank() == 0:
        files = sorted(p for p in (root / tmp_tag).rglob("*") if p.is_file())
        meta = {"version": s3dist.__version__, "tag": tag, "state": vars(state), "config": config,
                "param_layout": PARAM_LAYOUT,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "checksums": {str(p.relative_to(root / tmp_tag)): _sha256(p) for p in files}}
        _fsync_write(root / tmp_tag / META, json.dumps(meta, indent=1))
        final = root / tag
        if final.exists():  # a re-run of the same step (after a resume) replaces it; removed by _prune
            shutil.rmtree(root / f".deleting-{tag}", ignore_errors=True)
            final.rename(root / f".deleting-{tag}")
        os.replace(root / tmp_tag, final)
        _fsync_write(root / LATEST, tag)
        _prune(root, keep_last)
    _barrier()
    return root / tag


def _complete(root: Path) -> list[Path]:
    """Published checkpoints (a meta file, not a `.tmp-` save in progress), oldest first."""
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / META).exists() and not p.name.startswith("."))


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints. Each is first renamed to `.deleting-<tag>` (one
    atomic step), so a reader (`--resume`, `s3dist eval --run`) never finds a published checkpoint with
    files missing, and a deletion cut short leaves only a hidden folder, removed by the next prune."""
    for old in _complete(root)[:-keep_last]:
        aside = old.with_name(f".deleting-{old.name}")
        if aside.exists():  # a leftover of the same tag (a re-run of that step)
            shutil.rmtree(aside, ignore_errors=True)
        old.rename(aside)
    for aside in root.glob(".deleting-*"):
        shutil.rmtree(aside, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # a save cut short by a crash; saves are collective, so none is running now
        shutil.rmtree(stale, ignore_errors=True)


def set_aside_later_checkpoints(run_dir: Path, resumed: Path) -> list[Path]:
    """A resume from an older checkpoint of this run abandons the checkpoints after it: move them to
    `checkpoints/abandoned-<time>/` (kept, never deleted) and point `latest` at `resumed`. Left in place they
    would outrank the new line's checkpoints: pruning keeps the highest steps, so each new one would be deleted
    as it was published, and `--resume auto` would go back to the abandoned line."""
    root = run_dir / "checkpoints"
    if not root.is_dir() or resumed.parent.resolve() != root.resolve():
        return []
    step = read_meta(resumed, verify=False)["state"]["global_step"]
    later = [c for c in _complete(root) if read_meta(c, verify=False)["state"]["global_step"] > step]
    if later:
        aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        for c in later:
            c.rename(aside / c.name)
        log.warning("resuming from %s, an older checkpoint of this run: the later %s moved to %s (kept; "
                    "delete them when they are no longer needed)", resumed.name,
                    ", ".join(c.name for c in later), aside)
    _fsync_write(root / LATEST, resumed.name)
    return later


def read_meta(ckpt: Path, verify: bool = True) -> dict:
    """Meta of a complete checkpoint; with `verify`, every recorded checksum is checked."""
    meta_path = ckpt / META
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete: {META} is missing (a save was interrupted?); "
                              f"resume from an older checkpoint or remove this directory")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint '{meta_path}' is not valid JSON: {e}") from e
    if verify:
        for rel, digest in meta["checksums"].items():
            f = ckpt / rel
            if not f.exists():
                raise CheckpointError(f"checkpoint file '{f}' is missing; the checkpoint is unusable")
            if _sha256(f) != digest:
                raise CheckpointError(f"checkpoint file '{f}' does not match its recorded sha256 (truncated or "
                                      f"corrupted); resume from an older checkpoint")
    return meta


def find_latest(run_dir: Path) -> Path | None:
    """Newest complete checkpoint: the one `latest` names, else the newest directory with a meta file."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        if name:  # empty: a write of 'latest' cut short; the newest complete checkpoint is found below
            check_safe_name("checkpoint tag in 'latest'", name)
            if (root / name / META).exists():
                return root / name
    complete = _complete(root)
    return complete[-1] if complete else None


def optimizer_state_mismatch(meta: dict, world_size: int, ep_size: int) -> str | None:
    """Why this run cannot take the checkpoint's optimizer and LR-scheduler state (None: it can).

    DeepSpeed loads module weights on any layout (experts by global index) but not the optimizer state:
    each rank's covers the experts that rank held, in the parameter layout it was written with."""
    old_ep = meta["config"]["dist"]["ep_size"] or meta["world_size"]
    if meta["world_size"] != world_size:
        return (f"it was written by {meta['world_size']} ranks, this run has {world_size}: model weights and "
                "experts are resharded, optimizer and LR-scheduler state are reset (DeepSpeed cannot reshard them)")
    if old_ep != ep_size:
        return (f"it was written with dist.ep_size={old_ep}, this run has {ep_size} (same {world_size} ranks): "
                "experts are resharded, the expert optimizer state cannot be, so optimizer and LR-scheduler state "
                "are reset; data position and RNG continue")
    # every stage: Stage 2's optimizer holds the routers, stacked since layout 2
    layout = param_layout(meta)
    if layout != PARAM_LAYOUT:
        return (f"it was written by s3dist {meta.get('version', '?')} with {PARAM_LAYOUTS.get(layout, f'layout {layout}')}; "
                f"this version has {PARAM_LAYOUTS[PARAM_LAYOUT]}, so the optimizer state's flat layout differs: the "
                "weights load unchanged, optimizer and LR-scheduler state are reset (Adam restarts its moments); "
                "data position and RNG continue")
    return None


def load_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / f"s3dist_rank{rank}.pt"
    if not path.exists():
        raise CheckpointError(f"checkpoint '{ckpt}' has no state for rank {rank} ({path.name}); it was written by a "
                              f"run with fewer ranks — data position and RNG cannot be restored for this rank")
    return torch.load(path, weights_only=True)


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
    (`s3dist.config.RESUMABLE_KEYS`). `command` is the command's RunConfig, `given` the dotted keys it sets
    (recipe and overrides): every other key keeps the run's value, whatever the defaults say.

    Returns (config, changed, forced), the last two lists of (key, old value, new value). Any other key that
    differs is refused with a ConfigError naming every such key and both values, unless `force`
    (--force-config); keys that shape the weights (SHAPE_KEYS) are refused even then."""
    from s3dist.config import ConfigError, absolute_local_path, from_dict, resumable, to_dict, validate

    try:
        config = from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"the config stored in '{ckpt / META}' is not valid for this s3dist: {e}") from e
    config.data.path = absolute_local_path(config.data.path)  # runs before 2026-12-02 stored it as given
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
    from s3dist.config import STAGE_NAMES, ConfigError

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
    from s3dist.config import RESUMABLE_KEYS

    return ", ".join(k + "*" if k[-1] in "._" else k for k in RESUMABLE_KEYS if k not in COMMAND_KEYS)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export(run_dir: Path, out: Path) -> Path:
    """The run's newest checkpoint as a folder (config.json, model.safetensors with every expert, model card
    README.md; see `s3dist.pretrained`), or as one safetensors file when `out` ends in `.safetensors`."""
    if out.suffix == ".safetensors":
        return export_file(run_dir, out)
    return export_folder(run_dir, out)


def export_folder(run_dir: Path, out: Path) -> Path:
    """Written next to `out` and renamed into place, so a failed export leaves no half-written folder; an
    existing export at `out` is replaced, any other existing, non-empty path refused."""
    from s3dist.pretrained import S3Encoder

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or _is_export_folder(out))):
        raise CheckpointError(f"'{out}' exists and is not an s3dist export folder; choose another --out (a path "
                              f"ending in .safetensors writes one file instead)")
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
    """One safetensors file with every expert and the config: loadable without DeepSpeed or ranks."""
    from safetensors.torch import save_file

    from s3dist.pretrained import shareable

    ckpt = find_latest(run_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under '{run_dir / 'checkpoints'}'")
    meta = read_meta(ckpt)
    tensors = consolidated_state_dict(ckpt)
    tmp = out_file.with_name(out_file.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"s3dist_config": json.dumps(meta["config"]),
                                           "s3dist_version": s3dist.__version__, "checkpoint": ckpt.name})
    shareable(tmp)
    os.replace(tmp, out_file)
    return out_file


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Module weights from DeepSpeed's files with experts renamed to their global index (ep-size free).

    DeepSpeed stores the non-expert module in `mp_rank_00_model_states.pt` and each expert in
    `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` keyed by its local name; both are pickles
    written by DeepSpeed, checked against recorded sha256 sums (`read_meta`) before loading.
    """
    model_file = ckpt / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise CheckpointError(f"checkpoint file '{model_file}' is missing")
    # DeepSpeed's model-state file holds non-tensor objects (its own config), so it cannot be read
    # with weights_only=True; its sha256 was verified by read_meta before we get here.
    state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    out = {k: v for k, v in state.items() if ".deepspeed_experts." not in k}
    for f in sorted(ckpt.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
        expert_state = torch.load(f, map_location="cpu", weights_only=True)
        for k, v in expert_state.items():
            out[k] = v  # DeepSpeed already names experts by global index in these files
    return {k: v.contiguous() for k, v in out.items()}


def load_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if not meta or "s3dist_config" not in meta:
        raise CheckpointError(f"'{path}' is not an s3dist export (no s3dist_config metadata)")
    return json.loads(meta["s3dist_config"]), load_file(str(path))


def add_subcommands(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--run", required=True, type=Path, help="run directory")
    p.add_argument("--out", required=True, type=Path,
                   help="output folder (config.json, model.safetensors, README.md: load it with "
                        "s3dist.S3Encoder.from_pretrained), or a path ending in .safetensors for one file")
    p.set_defaults(func=_cli_export)


def _cli_export(args) -> int:
    from s3dist.config import ConfigError

    try:
        print(export(args.run, args.out))
    except (CheckpointError, ConfigError) as e:  # exit 2 with the message, not a traceback
        print(f"s3dist export: {e}", file=sys.stderr)
        return 2
    return 0


