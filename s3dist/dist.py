"""Distributed setup, in one place: process group, parallel sizes, expert groups, DeepSpeed engines.

Everything that knows about ranks, backends or DeepSpeed's engine lives here; the model takes only
(ep_size, ep_rank) and the training loop only a `ParallelDims` and an engine.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from s3dist.config import ConfigError, DistConfig, OptimConfig
from s3dist.importing import MLFLOW, unimportable


@dataclass(frozen=True)
class ParallelDims:
    """Who this process is. world = ep_size x expert_dp_size; every rank reads its own data."""

    rank: int
    local_rank: int
    world_size: int
    ep_size: int
    device: torch.device
    backend: str

    @property
    def expert_dp_size(self) -> int:
        """Replicas of each expert (DeepSpeed's expert-data-parallel group size)."""
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        # DeepSpeed's expert-parallel groups are consecutive ranks ([0,1], [2,3], ...).
        return self.rank % self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A free TCP port on loopback (single-process runs, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: DistConfig) -> tuple[int, int, int, torch.device, str]:
    """Start (or join) the default process group. Returns (rank, local_rank, world, device, backend).

    Launched by `accelerate launch` / torchrun, RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* are set;
    a plain `python -m s3dist.train` (or `s3dist eval`, ...) runs as a world of one whose rendezvous is an
    in-process store: no port is bound, so two such commands on one host never race for one.
    """
    solo = "RANK" not in os.environ
    if solo:  # the variables DeepSpeed and the launch-aware code read; the port is never bound
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("config key 'dist.backend' = 'nccl' needs CUDA; use dist.backend=gloo (or auto) on CPU")
    if cfg.dtype == "bf16" and not cuda:
        raise ConfigError("config key 'dist.dtype' = 'bf16' needs CUDA here; use dist.dtype=fp32 on CPU")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    with unimportable(MLFLOW):  # DeepSpeed imports it for its autotuner (s3dist.importing)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

    # DeepSpeed picks its accelerator once, at first import, from DS_ACCELERATOR or its own probe. If
    # it disagrees with torch's device, the engine silently keeps the model on its own device and the
    # first collective fails far from the cause (e.g. "No backend type associated with device type cpu").
    ds_device = get_accelerator().device_name()
    if ds_device != device.type:
        raise ConfigError(f"DeepSpeed's accelerator is {ds_device!r} (DS_ACCELERATOR="
                          f"{os.environ.get('DS_ACCELERATOR', '<unset>')!r}) but torch's device is {device.type!r}: "
                          f"unset DS_ACCELERATOR or set DS_ACCELERATOR={'cuda' if cuda else 'cpu'}")
    # DeepSpeed 0.19's ZeRO-1/2 all-gathers partitions through torch.distributed.all_gather_into_tensor, which
    # torch 2.13 deprecates with a FutureWarning per call site; s3dist's own collectives use the current API.
    # Silence exactly that message so a default run's console shows only what a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if solo and not dist.is_initialized():
        # DeepSpeed takes a process group someone else started (`_new_groups_time_out_after` sets up its side)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if not dist.is_initialized():
        # The timeout bounds how long survivors wait in a collective when a rank dies. DeepSpeed print()s
        # "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" here on every rank; rank 0's
        # copy is enough. Only bare print()s go quiet: DeepSpeed's logger keeps the stdout it got at import,
        # and failures are raised.
        quiet = contextlib.nullcontext() if rank == 0 else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
    _new_groups_time_out_after(timeout)
    return rank, local_rank, world, device, backend


def _new_groups_time_out_after(timeout: datetime.timedelta) -> None:
    """Give every process group DeepSpeed creates from now on the run's collective timeout.

    DeepSpeed makes the expert-parallel, expert-data-parallel and data-parallel groups with
    `new_group(ranks)`, and torch gives a group made without a timeout its own default (30 min on gloo, 10 on
    nccl), not the world group's: a rank that stalls (not dies) would hold the others in an all-to-all for
    that long instead of `dist.timeout_s`. DeepSpeed's backend object offers no timeout, so its `new_group`
    is replaced by one that passes ours."""
    from deepspeed import comm

    if comm.comm.cdb is None:  # a group someone else started: DeepSpeed's backend is not set up yet
        comm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    comm.comm.cdb.new_group = lambda ranks: dist.new_group(ranks, timeout=timeout)


def collective_device() -> torch.device:
    """Where a tensor must live to go through the default process group: nccl moves only CUDA tensors,
    gloo (here) CPU ones. For host-side figures (timings, counts) that are reduced across ranks."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def make_dims(rank: int, local_rank: int, world: int, device: torch.device, backend: str, ep_size: int) -> ParallelDims:
    return ParallelDims(rank, local_rank, world, ep_size, device, backend)


def create_expert_groups(model: nn.Module) -> None:
    """Create the expert / expert-data-parallel groups of every ep_size the model's MoE layers use, as
    DeepSpeed's `MoE._create_process_groups` would (same call, same layout), before DeepSpeed gets there:
    it would otherwise print "No existing process group found, creating a new group named: ep_size_N" on
    every rank (a bare print, not its logger)."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    for ep in sorted({m.ep_size for m in model.modules() if isinstance(m, MoE)}):
        if f"ep_size_{ep}" not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep)


def attach_expert_groups(model: nn.Module, dims: ParallelDims) -> None:
    """Create DeepSpeed's expert / expert-data-parallel groups and hand them to every MoE layer.

    The DeepSpeed engine does this itself at `initialize`; evaluation, export and the tests use the
    model without an engine and call this instead.
    """
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    create_expert_groups(model)
    for module in model.modules():
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism()
            got = groups._get_expert_parallel_rank(module.expert_group_name)
            if got != dims.ep_rank:  # our expert seeding assumed DeepSpeed's consecutive layout
                raise RuntimeError(f"DeepSpeed placed rank {dims.rank} at expert-parallel rank {got}, "
                                   f"expected {dims.ep_rank}; this DeepSpeed version changed its group layout")


def optimizer_param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups, split by DeepSpeed so expert params reduce over the expert-data-parallel group.

    Weights (matrices) decay, biases and norms do not; a stacked parameter (one copy per expert or per
    modality, `s3dist.model.stacked`) is judged by one copy's shape, not the stack's."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    def is_matrix(p: nn.Parameter) -> bool:
        return p.ndim - getattr(p, "stacked_dims", 0) >= 2

    decay = [p for p in params if is_matrix(p)]
    no_decay = [p for p in params if not is_matrix(p)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay, "name": "decay"},
                          {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}) if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_engine(model: nn.Module, params: list[nn.Parameter], *, lr: float, total_steps: int,
                 optim: OptimConfig, dist_cfg: DistConfig, micro_batch: int):
    """A DeepSpeed engine over `params` (all of the model, or only the routers in Stage 2).

    Parameters not in `params` are frozen first, so the engine neither stores optimizer state for
    them nor reduces their gradients.
    """
    import deepspeed

    if dist_cfg.zero_stage == 3:
        raise ConfigError("ZeRO stage 3 is not supported with DeepSpeed MoE; use dist.zero_stage in 0..2")
    chosen = {id(p) for p in params}
    has_trainable_experts = any(not getattr(p, "allreduce", True) for p in params)
    # ZeRO 1/2 insists on an expert param group whenever the model has MoE layers; Stage 2 trains
    # only routers (a few % of the parameters, nothing worth sharding), so it runs at stage 0.
    zero_stage = dist_cfg.zero_stage if has_trainable_experts else 0
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    for m in model.modules():  # moe.balance=bias: the selection bias moves only while experts train (S3Router)
        if hasattr(m, "bias_updates"):
            m.bias_updates = has_trainable_experts
    optimizer = torch.optim.AdamW(optimizer_param_groups(params, optim.weight_decay), lr=lr,
                                  betas=(optim.beta1, optim.beta2))
    warmup = max(1, optim.warmup_steps)

    def schedule(step: int) -> float:
        # Linear warm-up, then cosine decay to 10% of the peak over the stage.
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dist_cfg.dtype == "bf16", "check_grad_overflow": dist_cfg.bf16_grad_check},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    create_expert_groups(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine
