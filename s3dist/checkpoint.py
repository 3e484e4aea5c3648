"""Checkpoint I/O: atomic DeepSpeed checkpoints plus s3dist's own state, and finding the newest one.

Layout under `<run>/checkpoints/`:
    step-00000050/                    one complete checkpoint (DeepSpeed files, one per expert, +):
        s3dist_rank{r}.pt             per-rank state: RNG states, data-stream position (weights-only)
        s3dist_meta.json              stage, steps, config, version, sha256 of every file
    latest                            name of the newest complete checkpoint (moved last, atomically)

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` only after every rank finished
and the checksums are recorded, so a crash mid-save (or a full disk) leaves the previous checkpoint
and `latest` untouched. The directory must be on a file system every rank sees (as DeepSpeed's own
multi-node checkpointing requires).

`consolidated_state_dict` reads a checkpoint's weights back as one ep-size-free state dict, for export
(`s3dist.export`) and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import s3dist
from s3dist.config import check_safe_name

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
        raise CheckpointError(f"checkpoint '{ckpt}' is incomplete: {META} is missing (a save was interrupted?)")
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
                                      f"corrupted); the checkpoint is unusable")
    return meta


def resume_instead(ckpt: Path) -> str:
    """What a resume can continue from instead of the unusable `ckpt`: the newest other complete checkpoint
    beside it, named (tags sort by step), or, when there is none, a fresh start."""
    others = [c for c in _complete(ckpt.parent) if c.name != ckpt.name] if ckpt.parent.is_dir() else []
    if others:
        return f"resume from the newest other complete checkpoint with --resume {others[-1]}"
    return f"there is no other complete checkpoint in '{ckpt.parent}': start the run over (--overwrite)"


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


# --------------------------------------------------------------------------------------------
# Consolidated weights (export, evaluation)
# --------------------------------------------------------------------------------------------


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
