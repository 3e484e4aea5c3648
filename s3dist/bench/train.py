"""`s3dist bench train`: throughput and anatomy of a full S3 Stage-1 step on DeepSpeed engines.

On `--ranks` real processes, with the run config (embedded defaults < `--config` < overrides), one
process group and one stream over the embedded synthetic data set, three layouts are built side by
side and their steps interleaved (order alternating, a barrier before each, the slowest rank's time,
median of `--repeats`), so their ratios come from the same minutes of the same machine:

* `s3 ep=E` (E = `--ep`): the S3 encoder, experts sharded over E ranks;
* `s3 ep=1`: the same encoder, every rank holding every expert (pure data parallel);
* `dense`: `moe.kind=dense`, an MLP per modality with the active parameters of k experts.

A step is what `Trainer.run_stage` does per step: next batch, `specialize_loss` (two augmented views
in one encoder call), the one-flag all-reduce, `engine.backward`, `engine.step`. A profiled pass
splits it into data wait / forward / all-to-all / backward / optimizer (all-to-all carved out of
forward and backward; gradient all-reduces stay in backward and are also reported on their own), and
gives the peak of live tensor memory in a step and the aten ops dispatched per step
(`aten_ops_per_step`, nested ops included). Parameter bytes per rank are counted and the expert share
is asserted to be 1/ep of all expert bytes. The host's own cost, `host_ms_per_step`, is the first
layout's CPU time per step at a tiny width (`tiny_width`: same layers, experts and k, compute
negligible): what a GPU step costs the host before any kernel runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
from dataclasses import asdict

from s3dist.bench.common import at_least, interleaved_times, print_table, record
from s3dist.bench.ranks import count_collective_bytes, spawn_ranks

PHASES = ("data", "forward", "all_to_all", "backward", "optimizer")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ranks", type=at_least(1), default=2)
    p.add_argument("--ep", type=at_least(0), default=0, help="expert-parallel size of the S3 layout (0: --ranks)")
    p.add_argument("--config", default=None, help="run recipe (YAML); default: the embedded defaults")
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed steps per layout (median reported)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / ranks)")
    p.add_argument("--no-compare", action="store_true", help="time only the S3 layout at --ep")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="per-device dense peak for MFU (0: the GPU's bf16 peak where known, none on CPU)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=32")


# ---------------------------------------------------------------------------------------------
# One layout on this rank
# ---------------------------------------------------------------------------------------------


class Layout:
    """An encoder + DeepSpeed engine for one (kind, ep) and the Stage-1 step on it."""

    def __init__(self, name: str, cfg, dims, dims_in: dict[str, int], modalities: list[str]):
        import torch

        from s3dist.dist import build_engine
        from s3dist.model.encoder import S3Encoder

        self.name, self.cfg, self.dims, self.modalities = name, cfg, dims, modalities
        torch.manual_seed(cfg.seed)  # as s3dist.train: dense init identical on all ranks
        self.model = S3Encoder(dims_in, cfg.model, cfg.moe, ep_size=dims.ep_size, ep_rank=dims.ep_rank).to(dims.device)
        self.engine = build_engine(self.model, list(self.model.parameters()), lr=cfg.optim.lr,
                                   total_steps=10 ** 6, optim=cfg.optim, dist_cfg=cfg.dist,
                                   micro_batch=cfg.data.batch_size)
        self.engine.train()

    def step(self, next_batch, mark=None) -> int:
        """One Stage-1 step; `mark(phase)` returns a context manager around each phase. Returns the
        batch's valid tokens (time steps with mask True, all modalities)."""
        import contextlib

        from s3dist.objectives import specialize_loss
        from s3dist.trainer import agree_step_flags

        mark = mark or (lambda phase: contextlib.nullcontext())
        with mark("data"):
            batch = next_batch()
        with mark("forward"):
            loss, _ = specialize_loss(self.engine, batch, self.cfg, self.modalities)
            # the trainer's per-step agreement on non-finite loss / pre-emption: one tiny all-reduce
            agree_step_flags(loss, False, self.dims.world_size)
        with mark("backward"):
            self.engine.backward(loss)
        with mark("optimizer"):
            self.engine.step()
        return int(sum(m.sum() for m in batch.masks.values()))

    def parameter_bytes(self) -> dict:
        expert = sum(p.numel() * p.element_size() for p in self.model.parameters() if not getattr(p, "allreduce", True))
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {"total": total, "expert": expert, "dense": total - expert}

    def active_parameters_per_token(self) -> int:
        """Parameters one token meets in the MoE / dense layers (router + k experts, or the dense MLP)."""
        cfg = self.cfg
        d, h, k, n = cfg.model.d_model, cfg.moe.expert_hidden, cfg.moe.resolved_top_k(), cfg.moe.resolved_num_experts()
        if cfg.moe.kind == "dense":
            per_layer = 2 * d * (h * k) + h * k + d
        else:
            per_layer = d * n + k * (2 * d * h + h + d)
        return cfg.model.num_layers * per_layer


def expected_expert_bytes(cfg) -> int:
    """All expert bytes of the model, over every rank (what ep ranks share between them)."""
    if cfg.moe.kind == "dense":
        return 0
    bytes_per_param = 2 if cfg.dist.dtype == "bf16" else 4  # DeepSpeed's bf16 mode keeps bf16 module params
    d, h = cfg.model.d_model, cfg.moe.expert_hidden
    experts = cfg.moe.total_experts(len(cfg.data.modalities))
    return cfg.model.num_layers * experts * (2 * d * h + h + d) * bytes_per_param


def count_step_flops(layout: Layout, next_batch) -> int:
    """Model FLOPs of one full step on this rank (forward + backward + the augmentations' matmuls), as
    torch's FlopCounterMode counts them: matmuls, convolutions and attention, not elementwise ops or
    communication, i.e. the numerator MFU conventionally uses (torchtitan, nanoGPT count the same ops
    analytically). Measured, not derived, so routing, capacity drops and the dense/MoE difference
    are all in it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        layout.step(next_batch)
    return int(counter.get_total_flops())


# Dense bf16 tensor-core peak per device (no sparsity), by name substring: the MFU denominator.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(requested: float) -> float | None:
    import torch

    if requested > 0:
        return requested
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
# Profiling a step
# ---------------------------------------------------------------------------------------------


def profile_step(layout: Layout, next_batch, steps: int) -> dict:
    """ms per step in each phase (all-to-all carved out of forward and backward), all-reduce ms, and
    the peak of live tensor memory above the step's start (CPU: profiler memory events; CUDA: the
    allocator's peak)."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = layout.dims.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with profile(activities=activities, profile_memory=not cuda) as prof:
        for _ in range(steps):
            dist.barrier()
            layout.step(next_batch, mark=lambda phase: record_function(f"bench::{phase}"))
            if cuda:
                torch.cuda.synchronize()
    spans = {p: [] for p in ("data", "forward", "backward", "optimizer")}
    a2a, allreduce, mem, aten_ops_seen = [], 0.0, [], []  # aten_ops_seen: (start, op name)
    for ev in prof.events():
        name = ev.name
        if name.startswith("bench::"):
            spans[name[7:]].append((ev.time_range.start, ev.time_range.end))
        elif name.startswith("aten::"):
            aten_ops_seen.append((ev.time_range.start, name))
        elif name == "_AllToAll":
            a2a.append((ev.time_range.start, ev.time_range.end))
        elif name == "gloo:all_reduce" or name.startswith("nccl:all_reduce"):
            allreduce += ev.cpu_time_total
        if not cuda and ev.self_cpu_memory_usage:  # allocations (ops) and frees ([memory] events)
            mem.append((ev.time_range.start, ev.self_cpu_memory_usage))
    ms = {p: sum(b - a for a, b in s) / 1e3 / steps for p, s in spans.items()}
    # Every aten op the dispatcher ran inside the step's phases (nested ones too: each is a dispatch,
    # i.e. host work; on a GPU most of them launch a kernel). The bench's own bookkeeping is outside.
    # Counted per phase and per op name, so a change's effect can be placed (e.g. DeepSpeed's per-tensor
    # gradient-bucket copies in backward, the optimizer's per-tensor norms).
    by_phase, by_name = collections.Counter(), collections.Counter()
    for t, op in aten_ops_seen:
        phase = next((p for p, s in spans.items() if any(a <= t <= b for a, b in s)), None)
        if phase is not None:
            by_phase[phase] += 1
            by_name[(phase, op)] += 1
    aten_ops = sum(by_phase.values())
    a2a_in = {p: sum(b - a for a, b in a2a if any(s <= a <= e for s, e in spans[p])) / 1e3 / steps
              for p in ("forward", "backward")}
    phases = {"data": ms["data"], "forward": ms["forward"] - a2a_in["forward"],
              "all_to_all": a2a_in["forward"] + a2a_in["backward"], "backward": ms["backward"] - a2a_in["backward"],
              "optimizer": ms["optimizer"]}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        live = peak = 0
        for _, delta in sorted(mem):
            live += delta
            peak = max(peak, live)
    return {"phase_ms": phases, "all_reduce_ms": allreduce / 1e3 / steps, "step_peak_tensor_bytes": int(peak),
            "aten_ops_per_step": aten_ops / steps,
            "aten_ops_by_phase": {p: by_phase[p] / steps for p in spans},
            "top_aten_ops": {p: dict([(op, n / steps) for (q, op), n in by_name.most_common() if q == p][:12])
                             for p in spans}}


def tiny_width(cfg):
    """`cfg` at a width where compute is negligible: same layers, experts, k, modalities and step
    sequence, but d_model = 2 x heads, expert (and dense) hidden 2 and 4 samples per rank. Its step time
    is the host's per-op work (dispatch, autograd, Python, DeepSpeed bookkeeping)."""
    import copy

    tiny = copy.deepcopy(cfg)
    tiny.model.d_model = 2 * max(1, getattr(tiny.model, "num_heads", 1))
    tiny.moe.expert_hidden = 2
    tiny.data.batch_size = 4
    return tiny


def host_overhead_ms(layout: Layout, open_stream, dims_in: dict[str, int], warmup: int, repeats: int) -> float:
    """Median CPU ms per Stage-1 step of `layout`'s config at `tiny_width` (this rank), on its own engine
    and stream. Called on every rank."""
    cfg = tiny_width(layout.cfg)
    tiny = Layout(f"{layout.name} tiny", cfg, layout.dims, dims_in, layout.modalities)
    _, next_batch = open_stream(cfg)
    _, cpu, _ = interleaved_times({"tiny": lambda: tiny.step(next_batch)}, warmup=warmup, repeats=repeats)
    return 1e3 * statistics.median(cpu["tiny"])


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, cfg_dict: dict, layouts: list[tuple[str, str, int]], warmup: int,
               repeats: int, profile_steps: int, data_url: str):
    import resource

    import torch
    import torch.distributed as dist

    from s3dist.config import RunConfig, from_dict, validate_world
    from s3dist.data.stream import training_stream
    from s3dist.dist import init_distributed, make_dims

    base: RunConfig = from_dict(cfg_dict)
    rank, local_rank, world, device, backend = init_distributed(base.dist)

    def open_stream(cfg):
        """The training stream of `cfg` and a `next_batch()` over it that rolls into the next epoch."""
        stream = training_stream(data_url, cfg.data, cfg.seed, rank, world)
        batches = iter(stream)

        def next_batch():
            nonlocal batches
            while True:
                try:
                    return next(batches).to(device)
                except StopIteration:  # next epoch
                    batches = iter(stream)
        return stream, next_batch

    stream, next_batch = open_stream(base)
    modalities = stream.modalities
    base.data.modalities = list(modalities)
    dims_in = {m: stream.manifest.modalities[m].shape[-1] for m in modalities}

    built = {}
    for name, kind, ep in layouts:
        cfg = from_dict(cfg_dict)
        cfg.data.modalities = list(modalities)
        cfg.moe.kind, cfg.dist.ep_size = kind, ep
        validate_world(cfg, world, len(modalities))
        built[name] = Layout(name, cfg, make_dims(rank, local_rank, world, device, backend, ep), dims_in, modalities)
    torch.manual_seed(base.seed + 1000 * rank)  # per-rank augmentation noise, as s3dist.train

    names = list(built)
    times, cpu, tokens = interleaved_times({n: (lambda lay=built[n]: lay.step(next_batch)) for n in names},
                                           warmup=warmup, repeats=repeats)
    tok = torch.tensor([sum(tokens[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(tok)

    out = {}
    for i, n in enumerate(names):
        lay = built[n]
        with count_collective_bytes() as c:
            lay.step(next_batch)
        out[n] = {"times": times[n], "cpu_times": cpu[n], "global_tokens_per_step": tok[i].item() / repeats,
                  "all_to_all_bytes_per_step": asdict(c), "parameter_bytes": lay.parameter_bytes(),
                  "expected_expert_bytes": expected_expert_bytes(lay.cfg), "ep": lay.dims.ep_size,
                  "active_parameters_per_token": lay.active_parameters_per_token(),
                  "flops_per_step": count_step_flops(lay, next_batch),
                  **profile_step(lay, next_batch, profile_steps)}
    first = names[0]
    out[first]["host_ms_per_step"] = host_overhead_ms(built[first], open_stream, dims_in, warmup, repeats)
    out["_rank"] = {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                    "batch_size": base.data.batch_size, "modalities": modalities,
                    "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None}
    return out


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def layouts_for(ep: int, compare: bool) -> list[tuple[str, str, int]]:
    out = [(f"s3 ep={ep}", "s3", ep)]
    if compare:
        if ep != 1:
            out.append(("s3 ep=1", "s3", 1))
        out.append(("dense", "dense", 1))
    return out


def measure(cfg, ranks: int, ep: int, *, compare: bool = True, warmup: int = 3, repeats: int = 10,
            profile_steps: int = 3, threads: int = 0, peak_tflops: float | None = None) -> dict:
    import tempfile

    from s3dist.config import to_dict

    with tempfile.TemporaryDirectory(prefix="s3dist-bench-train-") as tmp:
        data_url = cfg.data.path
        if not data_url:
            from s3dist.data.synth import generate

            data_url = f"{tmp}/data"
            generate(data_url, cfg.data.synth, name="synth")
        res = spawn_ranks(_rank_main, ranks, to_dict(cfg), layouts_for(ep, compare), warmup, repeats,
                          profile_steps, data_url, threads=threads)
    rank_info = [r.pop("_rank") for r in res]
    batch = rank_info[0]["batch_size"]
    figures = {"ranks": ranks, "batch_size_per_rank": batch, "modalities": rank_info[0]["modalities"],
               "max_rss_mb_per_rank": [r["max_rss_mb"] for r in rank_info], "layouts": {}}
    for name, r0 in res[0].items():
        med = statistics.median(r0["times"])
        pb = [r[name]["parameter_bytes"] for r in res]
        expert_total = r0["expected_expert_bytes"]
        for b in pb:  # every rank holds exactly its 1/ep of the experts
            if b["expert"] * r0["ep"] != expert_total:
                raise AssertionError(f"{name}: a rank holds {b['expert']} expert bytes, expected "
                                     f"{expert_total} / ep={r0['ep']} = {expert_total // r0['ep']}")
        figures["layouts"][name] = {
            "ep": r0["ep"], "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(r0["times"]),
            # CPU time (all threads, waiting excluded): the figure that survives a machine shared with other jobs
            "cpu_ms_per_rank_median": 1e3 * statistics.median(statistics.median(r[name]["cpu_times"]) for r in res),
            "samples_per_s": batch * ranks / med, "tokens_per_s": r0["global_tokens_per_step"] / med,
            "phase_ms": r0["phase_ms"], "all_reduce_ms": r0["all_reduce_ms"],
            "step_peak_tensor_mb_per_rank": [r[name]["step_peak_tensor_bytes"] / 2 ** 20 for r in res],
            "parameter_bytes_per_rank": pb, "expert_bytes_all_ranks": expert_total,
            "expert_fraction_per_rank": (pb[0]["expert"] / expert_total) if expert_total else None,
            "active_parameters_per_token": r0["active_parameters_per_token"],
            "all_to_all_bytes_per_step": r0["all_to_all_bytes_per_step"],
            "flops_per_step_per_rank": [r[name]["flops_per_step"] for r in res],
            # per device: this rank's counted FLOPs over the slowest rank's step time
            "model_tflops_per_s_per_rank": [r[name]["flops_per_step"] / med / 1e12 for r in res],
            "aten_ops_per_step": r0["aten_ops_per_step"],  # rank 0, profiled steps
            "aten_ops_by_phase": r0["aten_ops_by_phase"], "top_aten_ops": r0["top_aten_ops"]}
        if "host_ms_per_step" in r0:  # the first (S3) layout: CPU ms per step at tiny width, median over ranks
            figures["layouts"][name]["host_ms_per_step"] = statistics.median(r[name]["host_ms_per_step"] for r in res)
        v = figures["layouts"][name]
        v["mfu"] = (statistics.mean(v["model_tflops_per_s_per_rank"]) / peak_tflops) if peak_tflops else None
    lay = figures["layouts"]
    s3 = lay[f"s3 ep={ep}"]
    for other, key in (("s3 ep=1", f"ep{ep}_vs_ep1"), ("dense", "dense_vs_s3")):
        if other not in lay or (other == "s3 ep=1" and ep == 1):  # not the S3 layout against itself
            continue
        a, b = (s3, lay[other]) if other == "s3 ep=1" else (lay[other], s3)
        figures[f"ratio_{key}"] = a["samples_per_s"] / b["samples_per_s"]
        figures[f"cpu_ratio_{key}"] = b["cpu_ms_per_rank_median"] / a["cpu_ms_per_rank_median"]
    figures["load_average_1min"] = os.getloadavg()[0]
    figures["peak_tflops_per_device"] = peak_tflops
    figures["dtype"] = cfg.dist.dtype
    return figures


def run(args: argparse.Namespace) -> int:
    from s3dist.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    ep = args.ep or args.ranks
    fig = measure(cfg, args.ranks, ep, compare=not args.no_compare, warmup=args.warmup, repeats=args.repeats,
                  profile_steps=args.profile_steps, threads=args.threads,
                  peak_tflops=device_peak_tflops(args.peak_tflops))
    rows = []
    for name, v in fig["layouts"].items():
        pb = v["parameter_bytes_per_rank"][0]
        row = {"layout": name, "samples/s": v["samples_per_s"], "tokens/s": v["tokens_per_s"],
               "ms/step": v["step_ms_median"], "cpu ms/rank": v["cpu_ms_per_rank_median"],
               "aten ops/step": v["aten_ops_per_step"], "host ms (tiny)": v.get("host_ms_per_step", "-")}
        row.update({f"{p} ms": v["phase_ms"][p] for p in PHASES})
        row.update({"all-reduce ms": v["all_reduce_ms"], "peak MiB": max(v["step_peak_tensor_mb_per_rank"]),
                    "params MiB/rank": pb["total"] / 2 ** 20, "expert MiB/rank": pb["expert"] / 2 ** 20,
                    "expert share": (f"1/{round(1 / v['expert_fraction_per_rank'])}"
                                     if v["expert_fraction_per_rank"] else "-"),
                    "active params": v["active_parameters_per_token"],
                    "TFLOP/s/rank": statistics.mean(v["model_tflops_per_s_per_rank"])})
        if v["mfu"] is not None:
            row["MFU"] = f"{100 * v['mfu']:.2f}%"
        rows.append(row)
    print_table(rows)
    for name, v in fig["layouts"].items():
        if v["expert_bytes_all_ranks"]:
            print(f"{name}: expert bytes per rank {v['parameter_bytes_per_rank'][0]['expert']:,} = "
                  f"{v['expert_bytes_all_ranks']:,} / ep {v['ep']} (checked on every rank)")
    ratios = {k: v for k, v in fig.items() if "ratio_" in k}
    print(f"{args.ranks} ranks; median of {args.repeats} interleaved Stage-1 steps after {args.warmup} warm-up; "
          f"phases from {args.profile_steps} profiled steps (rank 0); peak = live tensors above the step start; "
          f"load average {os.getloadavg()[0]:.1f}; TFLOP/s = matmul FLOPs counted by torch's FlopCounterMode"
          + (f"; MFU against {fig['peak_tflops_per_device']:g} TFLOP/s dense bf16 peak per device"
             if fig["peak_tflops_per_device"] else ""))
    print("ratios (samples/s; cpu_: per CPU-second): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    record("train", fig, out=args.json or None)
    return 0
