"""The S3 training loop: Stage 1 (Specialization) and Stage 2 (Selection) on DeepSpeed engines.

Reads like the method: build the encoder once, then for each training stage build an engine over
the parameters that stage trains, stream batches, compute the stage's loss, step, log, checkpoint.
The stages' losses live in `s3dist.objectives`; Stage 3 (Sparsification) is inference-time and lives
in `s3dist.sparsify` / `s3dist.evaluate`.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from s3dist import EXIT_REQUEUE
from s3dist import checkpoint as ckpt_io
from s3dist.config import RunConfig, to_dict
from s3dist.dist import ParallelDims, build_engine
from s3dist.metrics import ImbalanceAlarm, MetricsLogger, SampleLog, moe_load_metrics, peak_memory_mb
from s3dist.model.encoder import S3Encoder
from s3dist.objectives import STAGE_LOSS
from s3dist.resume import check_compatible

log = logging.getLogger("s3dist")


class NonFiniteLossError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Pre-emption: a signal only sets a flag; ranks agree on it at the next step boundary.
# ---------------------------------------------------------------------------------------------


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: int | None = None
        for s in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    cfg: RunConfig
    dims: ParallelDims
    run_dir: Path
    model: S3Encoder
    stream: object                 # s3dist.data.stream.ShardStream over the train split
    logger: MetricsLogger
    preempt: PreemptionFlag = field(default_factory=PreemptionFlag)
    progress: object = None

    def __post_init__(self) -> None:
        self.modalities = self.model.modalities
        self.alarm = ImbalanceAlarm(self.cfg.logging.imbalance_threshold, self.cfg.logging.imbalance_patience)
        self.state = ckpt_io.TrainState(stage=self.cfg.stages.run[0], stage_step=0, global_step=0, stage_done=False)
        self._batches = None
        self._last_save = time.monotonic()
        self.window = _Window()
        self._resume_meta: dict | None = None
        self.sample_log = SampleLog(self.run_dir, self.dims.rank) if self.cfg.logging.sample_ids else None

    # -- stages --------------------------------------------------------------------------------
    def stage_params(self, stage: str) -> list[torch.nn.Parameter]:
        if stage == "specialize":
            return list(self.model.parameters())
        return self.model.router_parameters()

    def fit(self, resume_from: Path | None = None) -> ckpt_io.TrainState:
        training_stages = [s for s in self.cfg.stages.run if s in STAGE_LOSS]
        try:
            resume_meta = ckpt_io.read_meta(resume_from) if resume_from else None  # checksums verified here, once
        except ckpt_io.CheckpointError as e:
            raise ckpt_io.CheckpointError(f"{e}; {ckpt_io.resume_instead(resume_from)}") from None
        self._resume_meta = resume_meta
        if resume_meta:
            check_compatible(resume_meta, to_dict(self.cfg), resume_from)
            self.state = ckpt_io.TrainState(**resume_meta["state"])
            log.info("resuming from %s: %s step %d of %d, global step %d", resume_from, self.state.stage,
                     self.state.stage_step, self._total_steps(self.state.stage), self.state.global_step)
        try:
            for stage in training_stages:
                if resume_meta and self.state.stage in training_stages:
                    if training_stages.index(stage) < training_stages.index(self.state.stage):
                        continue
                    # a finished stage is skipped only if it reached the steps configured *now*
                    if stage == self.state.stage and self.state.stage_step >= self._total_steps(stage):
                        continue
                self.run_stage(stage, resume_from if (resume_meta and stage == self.state.stage) else None,
                               load_weights_from=resume_from if resume_meta else None)
                resume_meta = None
            if resume_meta is not None:
                # Every stage had finished (a job requeued or re-run after training, e.g. one that died in
                # the final evaluation): nothing trained, so nothing loaded the checkpoint. Load its weights
                # for what follows, which would otherwise evaluate the initial weights.
                self._load_finished(resume_from, resume_meta["state"]["stage"])
        finally:
            self._batches = None
            self.stream.close()  # the reader it may have started for the next epoch
            if self.sample_log is not None:
                self.sample_log.close()
        return self.state

    def _load_finished(self, ckpt: Path, stage: str) -> None:
        """The weights of a checkpoint whose stages all finished, through an engine of the stage that wrote
        it (DeepSpeed maps the expert files to this rank's experts and attaches the expert-parallel groups
        the evaluation's collectives use)."""
        stage = stage if stage in STAGE_LOSS else "specialize"
        engine = build_engine(self.model, self.stage_params(stage), lr=self.cfg.optim.lr,
                              total_steps=max(1, self._total_steps(stage)), optim=self.cfg.optim,
                              dist_cfg=self.cfg.dist, micro_batch=self.cfg.data.batch_size)
        self._load(engine, ckpt, full=False, stream=False)  # no batch is drawn: the data position is moot
        log.info("all stages of %s had finished: loaded its weights, nothing to train", ckpt.name)

    def _total_steps(self, stage: str) -> int:
        return self.cfg.stages.specialize_steps if stage == "specialize" else self.cfg.stages.select_steps

    def run_stage(self, stage: str, resume_ckpt: Path | None, load_weights_from: Path | None) -> None:
        cfg = self.cfg
        total = self._total_steps(stage)
        lr = cfg.optim.lr if stage == "specialize" else cfg.optim.router_lr
        params = self.stage_params(stage)
        if stage == "select":
            trained, whole = sum(p.numel() for p in params), sum(p.numel() for p in self.model.parameters())
            log.info("Stage 2 trains routers only: %d of %d parameters on this rank (%.2f%%)", trained, whole,
                     100 * trained / whole)
        engine = build_engine(self.model, params, lr=lr, total_steps=total, optim=cfg.optim,
                              dist_cfg=cfg.dist, micro_batch=cfg.data.batch_size)
        if resume_ckpt is not None:  # same stage: weights, optimizer, scheduler, data, RNG
            self._load(engine, resume_ckpt, full=True)
        else:
            if load_weights_from is not None:  # earlier stage finished: weights and data position only
                self._load(engine, load_weights_from, full=False)
            self.state = ckpt_io.TrainState(stage, 0, self.state.global_step, False, self.state.skipped_steps)
        engine.train()
        loss_fn = STAGE_LOSS[stage]
        window = self.window = self.window if resume_ckpt is not None else _Window()
        if self.progress is not None:
            self.progress.start(stage, total, self.state.stage_step)
        while self.state.stage_step < total:
            t0 = time.perf_counter()
            host_batch = self._next_batch()
            if self.sample_log is not None:
                self.sample_log.write(self.state.global_step + 1, stage, host_batch.ids.tolist())
            batch = host_batch.to(self.dims.device)
            t_data = time.perf_counter()
            loss, terms = loss_fn(engine, batch, cfg, self.modalities)
            t_fwd = time.perf_counter()
            nonfinite, preempt = self._agree(loss)
            if nonfinite:
                self._on_nonfinite(engine, batch, stage)
            else:
                engine.backward(loss)
                t_bwd = time.perf_counter()
                engine.step()
                window.add(terms, len(batch), batch, t_data - t0, t_fwd - t_data, t_bwd - t_fwd,
                           time.perf_counter() - t_bwd)
            self.state.stage_step += 1
            self.state.global_step += 1
            if self.state.stage_step % cfg.logging.every_steps == 0 or self.state.stage_step == total:
                self._log(stage, engine, window)
                window = self.window = _Window()
            if self.progress is not None:
                self.progress.update(self.state.stage_step, terms["loss"], len(batch) * self.dims.world_size)
            del batch
            host_batch.release()  # its buffers serve a later batch (the step no longer reads them)
            done = self.state.stage_step == total
            self.state.stage_done = done
            if done or preempt or self._save_due():
                self.save(engine)
            if preempt:
                log.warning("pre-emption signal received: checkpoint written at step %d; exiting with %d so the "
                            "job can be requeued (--resume auto)", self.state.global_step, EXIT_REQUEUE)
                sys.exit(EXIT_REQUEUE)
        if self.progress is not None:
            self.progress.close()

    # -- pieces ----------------------------------------------------------------------------------
    def _next_batch(self):
        while True:
            if self._batches is None:
                self._batches = iter(self.stream)
            try:
                return next(self._batches)
            except StopIteration:  # the stream advanced its epoch; start the next one
                self._batches = None

    def _agree(self, loss: torch.Tensor) -> tuple[bool, bool]:
        return agree_step_flags(loss, self.preempt.raised, self.dims.world_size)

    def _on_nonfinite(self, engine, batch, stage: str) -> None:
        self.state.skipped_steps += 1
        if self.cfg.optim.nonfinite_loss == "stop":
            path = self.run_dir / f"nonfinite_step{self.state.global_step}_rank{self.dims.rank}.pt"
            torch.save({"ids": batch.ids, "features": batch.features, "masks": batch.masks, "stage": stage,
                        "step": self.state.global_step}, path)
            raise NonFiniteLossError(f"non-finite loss at {stage} step {self.state.stage_step} (global "
                                     f"{self.state.global_step}); the batch is saved in {path.name} for inspection. "
                                     f"Set optim.nonfinite_loss=skip to skip such steps instead.")
        log.warning("non-finite loss at global step %d: step skipped (%d so far)", self.state.global_step,
                    self.state.skipped_steps)

    def _save_due(self) -> bool:
        c = self.cfg.checkpoint
        if c.every_steps and self.state.stage_step % c.every_steps == 0:
            return True
        if not c.every_minutes:  # no clock to agree on: no tensor, no collective, no host sync
            return False
        if time.monotonic() - self._last_save > 60 * c.every_minutes:
            # ranks must agree: use rank 0's clock
            due = torch.tensor([1.0], device=self.dims.device)
        else:
            due = torch.tensor([0.0], device=self.dims.device)
        if self.dims.world_size > 1:
            dist.broadcast(due, src=0)
        return bool(due.item())

    def save(self, engine) -> Path:
        path = ckpt_io.save(engine, self.run_dir, self.state, to_dict(self.cfg), self.stream.state_dict(),
                            self.cfg.checkpoint.keep_last,
                            extra={"window": self.window.state_dict(), "alarm": self.alarm.state_dict()})
        self._last_save = time.monotonic()
        return path

    def _load(self, engine, ckpt: Path, full: bool, stream: bool = True) -> None:
        """Weights and the imbalance alarm's state from `ckpt`, and the RNG on the same world size; with `full`
        also the optimizer and LR schedule (where the layout allows) and the log window; with `stream` the data
        stream's position."""
        meta = self._resume_meta  # read, verified and checked for compatibility by fit()
        same_world = meta["world_size"] == self.dims.world_size
        mismatch = ckpt_io.optimizer_state_mismatch(meta, self.dims.world_size, self.dims.ep_size)
        load_optim = full and mismatch is None
        if full and mismatch and self.dims.is_main:  # one job-wide fact: said once, not once per rank
            log.warning("checkpoint %s: %s", ckpt.name, mismatch)
        configured = [{k: g[k] for k in ("betas", "weight_decay")} for g in engine.optimizer.param_groups]
        base_lrs = list(engine.lr_scheduler.base_lrs)
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=load_optim,
                               load_lr_scheduler_states=load_optim, load_module_only=not load_optim)
        if load_optim:
            _keep_configured_hyperparameters(engine, configured, base_lrs)
        main_state = ckpt_io.load_rank_state(ckpt, 0)  # rank 0 always exists, and it is the rank that logs
        if same_world:
            rank_state = main_state if self.dims.rank == 0 else ckpt_io.load_rank_state(ckpt, self.dims.rank)
            if stream:
                self.stream.load_state_dict(rank_state["stream"])
            ckpt_io.set_rng_state(rank_state["rng"])
            if full and "window" in rank_state.get("extra", {}):
                # the partial log window, so the first row logged after a resume averages the same steps
                self.window.load_state_dict(rank_state["extra"]["window"], self.dims.device)
        elif stream:
            # Every rank's stream state is the same position (rows taken from each partition), so the new
            # ranks continue the epoch from rank 0's without repeating or skipping a sample; RNG streams
            # are per rank and start anew.
            self.stream.load_state_dict(main_state["stream"])
            log.warning("the world size changed (%d -> %d ranks): the data stream continues its epoch over %d "
                        "partitions, %d rows per step (data.batch_size %d per rank); augmentation RNG restarts",
                        meta["world_size"], self.dims.world_size, self.stream.partitions,
                        self.stream.batch_size * self.dims.world_size, self.stream.batch_size)
        if "alarm" in main_state.get("extra", {}):  # checkpoints before the alarm had state have none
            self.alarm.load_state_dict(main_state["extra"]["alarm"])
        self._batches = None

    def _log(self, stage: str, engine, window: "_Window") -> None:
        load, hists = moe_load_metrics(self.model)
        scalars = window.reduce(self.dims)
        scalars.update(load)
        scalars["lr"] = engine.get_lr()[0]
        gn = engine.get_global_grad_norm()
        if gn is not None:
            scalars["grad_norm"] = float(gn)
        scalars["memory_mb"] = peak_memory_mb(self.dims.device)
        scalars["skipped_steps"] = self.state.skipped_steps
        self.logger.log(self.state.global_step, stage, scalars)
        for tag, values in hists.items():
            self.logger.histogram(self.state.global_step, tag, values)
        if self.dims.is_main:
            self.alarm.update(load)


def agree_step_flags(loss: torch.Tensor, preempt: bool, world_size: int) -> tuple[bool, bool]:
    """The one host sync of a training step: whether any rank's loss is non-finite (the step is then
    skipped everywhere) and whether any rank got a pre-emption signal, in one tiny MAX all-reduce.
    The flags are built on the device, so reading them is the only wait for it (not one more for
    `isfinite` in a Python `if`)."""
    nonfinite = (~torch.isfinite(loss.detach())).to(torch.float32)
    # full_like fills on the device; torch.tensor(..., device=cuda) would copy from the host and wait
    flags = torch.stack([nonfinite, torch.full_like(nonfinite, float(preempt))])
    if world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    nonfinite, preempted = flags.tolist()
    return bool(nonfinite), bool(preempted)


def _keep_configured_hyperparameters(engine, groups: list[dict], base_lrs: list[float]) -> None:
    """Loaded optimizer and scheduler states bring the checkpoint's peak lr, betas and weight decay; this run's
    config decides them (they differ only where --force-config changed optim.*). Moments and the schedule's
    position stay the checkpoint's."""
    sched = engine.lr_scheduler
    sched.base_lrs = base_lrs
    for group, configured, base, fn in zip(engine.optimizer.param_groups, groups, base_lrs, sched.lr_lambdas):
        group.update(configured, initial_lr=base, lr=base * fn(sched.last_epoch))


class _Window:
    """Per-log-interval accumulators, kept on device; reduced once when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.samples = 0
        self.tokens: int | torch.Tensor = 0  # a device tensor while steps accumulate
        self.times = [0.0, 0.0, 0.0, 0.0]
        self.t0 = time.perf_counter()

    def add(self, terms, n, batch, t_data, t_fwd, t_bwd, t_opt) -> None:
        for k, v in terms.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1
        self.samples += n
        # summed on the device, read once when the window is reduced: int() here waited for the GPU every step
        self.tokens = self.tokens + sum(m.sum() for m in batch.masks.values())
        self.times = [a + b for a, b in zip(self.times, (t_data, t_fwd, t_bwd, t_opt))]

    def state_dict(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps,
                "samples": self.samples, "tokens": int(self.tokens)}

    def load_state_dict(self, state: dict, device) -> None:
        self.sums = {k: torch.tensor(v, device=device) for k, v in state["sums"].items()}
        self.steps, self.samples, self.tokens = state["steps"], state["samples"], state["tokens"]

    def reduce(self, dims: ParallelDims) -> dict[str, float]:
        elapsed = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        # one vector, built on the device (the loss sums live there; nccl reduces only CUDA tensors)
        counts = torch.tensor([float(self.samples), 0.0], device=dims.device)
        counts[1] += self.tokens
        vec = torch.cat([*(self.sums[k].to(dims.device).reshape(1) for k in keys), counts])
        if dims.world_size > 1:
            dist.all_reduce(vec)
        vals = vec.tolist()
        steps = max(1, self.steps)
        out = {k: vals[i] / (steps * dims.world_size) for i, k in enumerate(keys)}
        samples, tokens = vals[-2], vals[-1]
        out["samples_per_s"] = samples / elapsed
        out["tokens_per_s"] = tokens / elapsed
        for name, t in zip(("data_wait", "forward", "backward", "optimizer"), self.times):
            out[f"time/{name}_ms"] = 1000 * t / steps
        return out
