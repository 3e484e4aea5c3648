"""Metrics: one small logging interface with pluggable backends, and MoE load statistics.

The training loop calls `MetricsLogger.log(step, stage, scalars)` and nothing else; backends
(JSON lines, TensorBoard, W&B, MLflow: `logging.trackers`) receive the same scalars. Only rank 0
writes. Expert-load counters live on device inside each router and are reduced across ranks once
per log interval (`moe_load_metrics`), never per step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from s3dist.config import LoggingConfig, flatten

log = logging.getLogger("s3dist")


class MetricsBackend(Protocol):
    def scalars(self, step: int, stage: str, values: dict[str, float]) -> None: ...
    def histogram(self, step: int, tag: str, values: np.ndarray) -> None: ...
    def image(self, step: int, tag: str, rgb: np.ndarray) -> None: ...
    def summary(self, step: int, values: dict[str, float], text: dict[str, str]) -> None: ...
    def close(self) -> None: ...


class JsonlBackend:
    """`metrics.jsonl`: one JSON object per logged *training* step (`step`, `stage`, then every scalar).
    Evaluation results are not steps of a time series: they live in eval.json (summaries are ignored here)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "a", buffering=1)

    def scalars(self, step, stage, values):
        self.f.write(json.dumps({"step": step, "stage": stage, **values}) + "\n")

    def histogram(self, step, tag, values):
        pass

    def image(self, step, tag, rgb):
        pass

    def summary(self, step, values, text):
        pass

    def close(self):
        self.f.close()


class TensorBoardBackend:
    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(str(logdir))

    def scalars(self, step, stage, values):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        self.w.flush()

    def histogram(self, step, tag, values):
        self.w.add_histogram(tag, np.asarray(values, dtype=np.float64), step)

    def image(self, step, tag, rgb):
        self.w.add_image(tag, rgb, step, dataformats="HWC")
        self.w.flush()

    def summary(self, step, values, text):
        for k, v in values.items():
            self.w.add_scalar(k, v, step)
        for k, v in text.items():
            self.w.add_text(k, v, step)
        self.w.flush()

    def close(self):
        self.w.close()


class AccelerateTrackerBackend:
    """Scalars, the run config (once, at start) and evaluation results to one of Accelerate's experiment
    trackers (`accelerate.tracking.WandBTracker`, `MLflowTracker`). Histograms, images and text are left to
    TensorBoard: each service has its own types for them, and eval.json already holds the evaluation."""

    def __init__(self, tracker, run_config: dict | None, clean_key=None) -> None:
        from accelerate import PartialState

        # Accelerate's trackers log through accelerate.logging, which refuses to run before its process state
        # exists. s3dist owns the process group: made after init_distributed, PartialState only reads it.
        PartialState()
        self.tracker = tracker
        self.clean_key = clean_key or (lambda k: k)
        tracker.start()
        if run_config:
            tracker.store_init_configuration({self.clean_key(k): v for k, v in flatten(run_config).items()})

    def scalars(self, step, stage, values):
        self.tracker.log({self.clean_key(k): v for k, v in values.items()}, step=step)

    def histogram(self, step, tag, values):
        pass

    def image(self, step, tag, rgb):
        pass

    def summary(self, step, values, text):
        if values:
            self.scalars(step, "eval", values)

    def close(self):
        self.tracker.finish()


def wandb_backend(run_dir: Path, run_config: dict | None) -> AccelerateTrackerBackend:
    """W&B's own variables decide (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME, WANDB_DIR, ...); s3dist
    fills in only what they leave open: project 's3dist', the run directory's name, files under it."""
    from accelerate.tracking import WandBTracker

    run_dir = Path(run_dir).resolve()
    kwargs = {}
    if "WANDB_NAME" not in os.environ:
        kwargs["name"] = run_dir.name
    if "WANDB_DIR" not in os.environ:
        kwargs["dir"] = str(run_dir)
    return AccelerateTrackerBackend(WandBTracker(os.environ.get("WANDB_PROJECT", "s3dist"), **kwargs), run_config)


def mlflow_backend(run_dir: Path, run_config: dict | None) -> AccelerateTrackerBackend:
    """MLFLOW_TRACKING_URI (and MLFLOW_EXPERIMENT_NAME, ...) when set; else a file store in <run_dir>/mlruns,
    experiment 's3dist', run named after the run directory."""
    import mlflow
    from accelerate.tracking import MLflowTracker

    run_dir = Path(run_dir).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (run_dir / "mlruns").as_uri()
        # MLflow 3 refuses a file store unless this is set, and its database stores need the full `mlflow`
        # package, whose pyarrow pin conflicts with s3dist's (s3dist[mlflow] installs mlflow-skinny).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)  # always: an earlier set_tracking_uri in this process would win over the variable
    tracker = MLflowTracker(experiment_name="s3dist", run_name=run_dir.name)
    # MLflow refuses other characters in metric and parameter names (modality names come from the data set)
    return AccelerateTrackerBackend(tracker, run_config, clean_key=lambda k: re.sub(r"[^\w/.\- :]", "_", k))


TRACKER_BACKENDS = {
    "tensorboard": lambda run_dir, run_config: TensorBoardBackend(run_dir / "tb"),
    "wandb": wandb_backend,
    "mlflow": mlflow_backend,
}


class MetricsLogger:
    """Fan-out to backends on rank 0; a no-op elsewhere."""

    def __init__(self, backends: list[MetricsBackend]) -> None:
        self.backends = backends

    def log(self, step: int, stage: str, values: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in values.items()}
        for b in self.backends:
            b.scalars(step, stage, clean)

    def histogram(self, step: int, tag: str, values) -> None:
        for b in self.backends:
            b.histogram(step, tag, np.asarray(values))

    def image(self, step: int, tag: str, rgb: np.ndarray) -> None:
        for b in self.backends:
            b.image(step, tag, rgb)

    def summary(self, step: int, values: dict[str, float], text: dict[str, str] | None = None) -> None:
        """Results of the run at `step` (evaluation): tracker scalars (and TensorBoard text), not metrics.jsonl
        rows."""
        clean = {k: float(v) for k, v in values.items()}
        for b in self.backends:
            b.summary(step, clean, text or {})

    def close(self) -> None:
        for b in self.backends:
            b.close()


def make_logger(run_dir: Path, is_main: bool, logging_cfg: LoggingConfig | bool = True,
                run_config: dict | None = None) -> MetricsLogger:
    """metrics.jsonl plus `logging.trackers` on rank 0; `run_config` (the run's config as a dict) goes to the
    trackers once. Call on every rank: each checks the trackers, so a missing package stops every rank alike.
    `logging_cfg` may be the older `logging.tensorboard` bool."""
    if isinstance(logging_cfg, bool):
        logging_cfg = LoggingConfig(tensorboard=logging_cfg)
    trackers = logging_cfg.resolved_trackers()
    if not is_main:
        return MetricsLogger([])
    backends: list[MetricsBackend] = [JsonlBackend(run_dir / "metrics.jsonl")]
    backends += [TRACKER_BACKENDS[name](run_dir, run_config) for name in trackers]
    return MetricsLogger(backends)


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after `after_step` (a resumed run re-logs them), atomically."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    tmp.replace(path)


class SampleLog:
    """`logging.sample_ids`: the sample ids of every training batch this rank takes, one JSON row per step
    ({"step", "stage", "ids"}) in <run>/samples/rank{r}.jsonl, to audit the data order (e.g. that a resume,
    also on another world size, repeated or skipped nothing). Opened at the first write: on a resume,
    rank 0 first truncates every rank's file to the checkpoint's step (`truncate_metrics`)."""

    def __init__(self, run_dir: Path, rank: int):
        self.path = run_dir / "samples" / f"rank{rank}.jsonl"
        self._f = None

    def write(self, step: int, stage: str, ids: list[int]) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")
        self._f.write(json.dumps({"step": step, "stage": stage, "ids": ids}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


# --------------------------------------------------------------------------------------------
# MoE load
# --------------------------------------------------------------------------------------------


def moe_load_metrics(encoder, *, reduce: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Pop every router's counters, all-reduce them once (SUM over all ranks), and turn them into
    `expert_load/{m}/layer{L}/expert{E}` (fractions summing to 1 over E) and `expert_balance/...`
    scalars, plus per-expert token histograms. Must be called on every rank (it is a collective)."""
    layout, chunks = [], []
    for li, layer in enumerate(getattr(encoder, "layers", [])):
        for router in getattr(layer, "routers", []):
            c = router.pop_load_counters()
            mods = getattr(router, "modalities", None) or layer.groups[layer.routers.index(router)]
            layout.append((li, router, mods, c.numel()))
            chunks.append(c)
    if not chunks:
        return {}, {}
    flat = torch.cat(chunks).double()
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    flat = flat.cpu().numpy()
    scalars, hists = {}, {}
    pos = 0
    for li, router, mods, size in layout:
        c = flat[pos:pos + size]
        pos += size
        e_total = router.num_experts
        demand, kept = c[:e_total], c[e_total:2 * e_total]
        tail = c[2 * e_total:]
        ent, cnt = tail[:len(mods)], tail[len(mods):]
        n = e_total if len(mods) == 1 else getattr(router, "n", e_total)
        for j, m in enumerate(mods):
            off = router.offset(m) if hasattr(router, "offset") else 0
            d, k = demand[off:off + n], kept[off:off + n]
            prefix = f"{m}/layer{li}"
            total = d.sum()
            frac = d / total if total > 0 else np.full(n, 1.0 / n)
            for e in range(n):
                scalars[f"expert_load/{prefix}/expert{e}"] = float(frac[e])
            mean = frac.mean()
            scalars[f"expert_balance/{prefix}/cv"] = float(frac.std() / mean) if mean > 0 else 0.0
            scalars[f"expert_balance/{prefix}/max_over_mean"] = float(frac.max() / mean) if mean > 0 else 0.0
            scalars[f"expert_balance/{prefix}/dropped_fraction"] = float(1 - k.sum() / total) if total > 0 else 0.0
            if cnt[j] > 0 and ent[j] > 0:
                scalars[f"expert_balance/{prefix}/router_entropy"] = float(ent[j] / cnt[j])
            hists[f"expert_load/{prefix}"] = frac
            hists[f"expert_tokens_before_capacity/{prefix}"] = d
            hists[f"expert_tokens_after_capacity/{prefix}"] = k
    return scalars, hists


class ImbalanceAlarm:
    """Warn once per (modality, layer) when max/mean load stays above a threshold for K intervals.

    Its state is part of the checkpoint, so a resumed run neither warns again about a layer it has warned
    about nor restarts a streak that was under way."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold, self.patience = threshold, patience
        self.streak: dict[str, int] = {}
        self.warned: set[str] = set()

    def state_dict(self) -> dict:
        return {"streak": dict(self.streak), "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.streak, self.warned = dict(state["streak"]), set(state["warned"])

    def update(self, scalars: dict[str, float]) -> list[str]:
        messages = []
        for tag, v in scalars.items():
            if not tag.endswith("/max_over_mean"):
                continue
            key = tag[len("expert_balance/"):-len("/max_over_mean")]
            self.streak[key] = self.streak.get(key, 0) + 1 if v > self.threshold else 0
            if self.streak[key] >= self.patience and key not in self.warned:
                self.warned.add(key)
                loads = {t.rsplit("/", 1)[1]: x for t, x in scalars.items() if t.startswith(f"expert_load/{key}/")}
                hottest = sorted(loads, key=loads.get, reverse=True)[:3]
                modality, layer = key.split("/")
                msg = (f"expert imbalance: modality '{modality}' {layer} has max/mean load {v:.2f} > "
                       f"{self.threshold} for {self.streak[key]} log intervals; hottest experts: "
                       + ", ".join(f"{h} ({loads[h]:.1%})" for h in hottest)
                       + ". Consider raising moe.aux_loss_weight (moe.balance=aux_loss) or moe.bias_update_rate "
                         "(balance=bias), or moe.capacity_factor.")
                log.warning(msg)
                messages.append(msg)
        return messages


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


