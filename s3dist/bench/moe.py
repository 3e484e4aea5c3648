"""`s3dist bench moe`: forward+backward throughput of the s3dist MoE layer against bare DeepSpeed MoE.

On `--ranks` real gloo processes (expert-parallel size `--ep`), in the same run on the same ranks:

* `s3dist`: `ExpertParallelMoE` with the S3 router, all modalities in one fused expert pool
  (one all-to-all pair per layer);
* `bare`: `deepspeed.moe.layer.MoE` with DeepSpeed's own `TopKGate`, the same tokens (already
  concatenated), the same number of experts, k, expert MLP and capacity;
* `topk-per-modality`: `ExpertParallelMoE(kind="topk")`, s3dist's wrapper around DeepSpeed's own
  gate with one DeepSpeed MoE per modality, i.e. one all-to-all pair per modality: in the fused case
  what fusing saves; in the single case (one group, same buffers as bare) the wrapper's own cost, so
  s3dist vs this row is the S3 router alone;
* `bare-free-gate`: the bare layer with its gate's first routes replayed (a gate that costs nothing;
  dispatch, all-to-all, experts and combine are DeepSpeed's, as in s3dist). It is the floor any gate can
  reach with DeepSpeed's dispatch kept, so `cpu_ceiling_vs_bare` (bare / this row) bounds what s3dist's
  router can gain over bare. The tokens are the same every step and nothing updates the gate, so the
  replayed routes are the ones the gate would compute; the record says whether the outputs matched bare's.

`--granularity G` sets the layer the way the config's `moe.granularity` does (N = G x rho experts per
modality, k = G) with fine-grained experts (k x hidden fixed); `--expert-compute` picks how the s3dist
layers run their local experts (`moe.expert_compute`; bare is always DeepSpeed's per-expert loop).

Repetitions interleave the variants (order alternating) after a warm-up, each step starts behind a
barrier, a step's time is the slowest rank's, and the median is reported. A separate profiled pass
(torch profiler) gives each variant's share of step time in all-to-all (the `_AllToAll` autograd
op, forward and backward), in other all-reduces, and in the gate's forward. The all-to-all bytes
are counted by wrapping `torch.distributed.all_to_all_single` during one step; `s3dist bench plan`
is checked against these counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict, dataclass

from s3dist.bench.common import at_least, interleaved_times, positive, print_table, record
from s3dist.bench.ranks import count_collective_bytes, spawn_ranks

MODALITIES = ("text", "audio", "vision")


def profile_shares(step, steps: int, gates=(), sync=None) -> dict:
    """Profile `steps` calls of `step()`: ms per step in all-to-all (fwd + bwd), in all-reduce and in the
    gates' forward, and their shares of the step.

    Collectives are synchronous on gloo: the main thread's `_AllToAll` op spans sending, waiting for the
    peer and receiving; an all-reduce runs as `gloo:all_reduce` on gloo's thread while the caller waits.
    `sync()` (a barrier) runs before each step, outside the timed span, so skew between ranks at the
    start of a step is not charged to the first collective.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    handles = []
    for gate in gates:
        marker: list = []
        handles.append(gate.register_forward_pre_hook(
            lambda mod, inp, marker=marker: marker.append(record_function("bench::gate_forward").__enter__())))
        handles.append(gate.register_forward_hook(
            lambda mod, inp, out, marker=marker: marker.pop().__exit__(None, None, None)))
    wall = 0.0
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                step()
                wall += time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    a2a = allreduce = gate = 0.0
    for ev in prof.events():
        if ev.name == "_AllToAll":
            a2a += ev.cpu_time_total
        elif ev.name == "gloo:all_reduce":  # a barrier is gloo:barrier, not counted
            allreduce += ev.cpu_time_total
        elif ev.name == "bench::gate_forward":
            gate += ev.cpu_time_total
    ms = 1e3 * wall / steps

    def per(us: float) -> float:
        return us / 1e3 / steps

    return {"profiled_ms_per_step": ms, "all_to_all_ms": per(a2a), "all_to_all_share": per(a2a) / ms,
            "all_reduce_ms": per(allreduce), "all_reduce_share": per(allreduce) / ms,
            "gate_forward_ms": per(gate), "gate_forward_share": per(gate) / ms,
            # the gates' own all-reduces (S3Router: capacity, balance statistics) run inside their forward
            "gate_forward_compute_ms": per(gate) - per(allreduce)}


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerSpec:
    modalities: list[str]
    batch: int          # samples per rank per modality
    steps: int          # time steps per sample (one token per step)
    d_model: int
    experts: int        # experts per modality (the fused pool holds len(modalities) x experts)
    topk: int
    hidden: int
    capacity_factor: float
    min_capacity: int = 4
    expert_compute: str = "auto"   # moe.expert_compute of the s3dist layers (bare keeps DeepSpeed's loop)

    @property
    def tokens_per_rank(self) -> int:
        return len(self.modalities) * self.batch * self.steps

    @property
    def total_experts(self) -> int:
        return len(self.modalities) * self.experts


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are the embedded default run: d_model 64, N = 4 experts per modality, k = 2, expert
    # hidden 128, batch 64 x 2 augmented views, 16 steps, three modalities.
    p.add_argument("--ranks", type=at_least(1), default=2)
    p.add_argument("--ep", type=at_least(0), default=0, help="expert-parallel size (0: --ranks)")
    p.add_argument("--case", choices=("fused", "single", "both"), default="both",
                   help="fused: three modalities in one expert pool; single: one modality")
    p.add_argument("--batch", type=at_least(1), default=128, help="samples per rank per modality")
    p.add_argument("--steps", type=at_least(1), default=16, help="time steps (tokens) per sample")
    p.add_argument("--d-model", type=at_least(1), default=64)
    p.add_argument("--experts", type=at_least(1), default=4, help="experts per modality")
    p.add_argument("--topk", type=at_least(1), default=2)
    p.add_argument("--hidden", type=at_least(0), default=0, help="expert MLP hidden width (0: 128, or with "
                   "--granularity the default's active width 2 x 128 split over k = G experts)")
    p.add_argument("--granularity", type=at_least(0), default=0,
                   help="chi = G: N = G x --expansion experts per modality and k = G (overrides --experts, --topk)")
    p.add_argument("--expansion", type=at_least(1), default=2, help="rho, with --granularity")
    p.add_argument("--capacity-factor", type=positive, default=1.25)
    p.add_argument("--expert-compute", choices=("auto", "loop", "grouped"), default="auto",
                   help="moe.expert_compute of the s3dist layers")
    p.add_argument("--warmup", type=at_least(0), default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--threads", type=at_least(0), default=0, help="torch threads per rank (0: cores / ranks)")


def _build_variants(spec: LayerSpec, ep: int, ep_rank: int):
    """name -> (module, step function, gates); each step is forward + backward of one layer."""
    import torch
    from deepspeed.moe.layer import MoE

    from s3dist.config import MoEConfig
    from s3dist.model.experts import ExpertMLP
    from s3dist.model.moe import ExpertParallelMoE

    d = spec.d_model
    cfg = MoEConfig(kind="s3", num_experts=spec.experts, top_k=spec.topk, expert_hidden=spec.hidden,
                    capacity_factor=spec.capacity_factor, min_capacity=spec.min_capacity, drop_tokens=True,
                    expert_compute=spec.expert_compute)
    gen = torch.Generator().manual_seed(1000 + int(os.environ.get("RANK", "0")))
    tokens = {m: torch.randn(spec.batch, spec.steps, d, generator=gen).requires_grad_() for m in spec.modalities}
    valid = {m: torch.ones(spec.batch, spec.steps, dtype=torch.bool) for m in spec.modalities}
    flat = torch.cat([t.detach().reshape(-1, d) for t in tokens.values()]).requires_grad_()
    w = torch.randn(d, generator=gen)

    def layer_step(layer):
        def step():
            out, aux, _ = layer(tokens, valid)
            loss = sum((o * w).sum() for o in out.values()) + 0.01 * aux
            loss.backward()
            layer.zero_grad(set_to_none=True)
        return step

    variants = {}
    s3 = ExpertParallelMoE(d, spec.modalities, cfg, ep_size=ep, ep_rank=ep_rank, layer_index=0)
    variants["s3dist"] = (s3, layer_step(s3), s3.routers)

    bare = MoE(hidden_size=d, expert=ExpertMLP(d, spec.hidden), num_experts=spec.total_experts, ep_size=ep,
               k=spec.topk, capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.capacity_factor,
               min_capacity=spec.min_capacity, drop_tokens=True, use_rts=False)

    def bare_step():
        out, aux, _ = bare(flat)
        ((out * w).sum() + 0.01 * aux).backward()
        bare.zero_grad(set_to_none=True)

    variants["bare"] = (bare, bare_step, [bare.deepspeed_moe.gate])
    variants["bare-free-gate"] = (bare, _free_gate_step(bare, flat, bare_step), [])

    per_mod = ExpertParallelMoE(d, spec.modalities, MoEConfig(**{**asdict(cfg), "kind": "topk"}), ep_size=ep,
                                ep_rank=ep_rank, layer_index=0)
    variants["topk-per-modality"] = (per_mod, layer_step(per_mod), per_mod.routers)
    return variants


def _free_gate_step(bare, flat, bare_step):
    """`bare_step` with the gate's output replayed: captured on the first call (its routing, capacity and
    counts as DeepSpeed's `MOELayer` takes them), then returned by every later call. The loss and gate
    values are detached leaves that require grad, so the backward still runs the combine's gate gradient.
    `replay_matches_bare` records whether the replayed layer's output equals the real one's."""
    import torch

    gate = bare.deepspeed_moe.gate
    real_forward = gate.forward
    replay: dict = {}

    def replayed(*args, **kwargs):
        return replay["routes"]

    def step():
        if "routes" not in replay:
            captured = []
            gate.forward = lambda *a, **k: captured.append(real_forward(*a, **k)) or captured[-1]
            try:
                with torch.no_grad():
                    want = bare(flat)[0]
            finally:
                gate.forward = real_forward
            out = list(captured[0])
            for i in (0, 5):  # l_aux and the gate values: leaves of the replayed graph
                out[i] = out[i].detach().requires_grad_()
            replay["routes"], replay["leaves"] = tuple(out), (out[0], out[5])
            gate.forward = replayed
            try:
                with torch.no_grad():
                    replay["matches"] = bool(torch.equal(bare(flat)[0], want))
            finally:
                gate.forward = real_forward
        gate.forward = replayed
        try:
            bare_step()
        finally:
            gate.forward = real_forward
        for leaf in replay["leaves"]:
            leaf.grad = None

    step.replay = replay
    return step


def _rank_main(rank: int, world: int, specs: dict, ep: int, warmup: int, repeats: int, profile_steps: int):
    """Every case on these ranks, one after the other; per case: times, CPU times, bytes, profile."""
    import torch
    from torch import nn

    from s3dist.config import DistConfig
    from s3dist.dist import attach_expert_groups, init_distributed, make_dims

    dims = make_dims(*init_distributed(DistConfig()), ep)
    results = {}
    for case, spec_dict in specs.items():
        torch.manual_seed(0)
        variants = _build_variants(LayerSpec(**spec_dict), ep, dims.ep_rank)
        attach_expert_groups(nn.ModuleList([v[0] for v in variants.values()]), dims)
        results[case] = _time_variants(variants, warmup, repeats, profile_steps)
    return results


def _time_variants(variants: dict, warmup: int, repeats: int, profile_steps: int) -> dict:
    import torch.distributed as dist

    names = list(variants)
    times, cpu, _ = interleaved_times({n: variants[n][1] for n in names}, warmup=warmup, repeats=repeats)

    counted, profiles = {}, {}
    for name in names:
        _, step, gates = variants[name]
        with count_collective_bytes() as c:
            step()
        counted[name] = asdict(c)
        profiles[name] = profile_shares(step, profile_steps, gates, sync=dist.barrier)
    checks = {n: {"replay_matches_bare": variants[n][1].replay["matches"]} for n in names
              if hasattr(variants[n][1], "replay")}
    return {"times": times, "cpu": cpu, "bytes": counted, "profile": profiles, "checks": checks}


def measure(specs: dict[str, LayerSpec], ranks: int, ep: int, *, warmup: int, repeats: int, profile_steps: int,
            threads: int = 0) -> dict:
    """Run the benchmark for each named layer shape; figures per case and variant (step times are the
    slowest rank's, CPU times the median over ranks, profile and byte counts rank 0's)."""
    res = spawn_ranks(_rank_main, ranks, {c: asdict(s) for c, s in specs.items()}, ep, warmup, repeats,
                      profile_steps, threads=threads)
    figures = {}
    for case, spec in specs.items():
        r0 = res[0][case]
        global_tokens = spec.tokens_per_rank * ranks
        out = {}
        for name, ts in r0["times"].items():
            med = statistics.median(ts)
            cpu_med = statistics.median([statistics.median(r[case]["cpu"][name]) for r in res])
            out[name] = {"step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(ts),
                         "tokens_per_s": global_tokens / med, "cpu_ms_per_rank_median": 1e3 * cpu_med,
                         "all_to_all_bytes_per_step": r0["bytes"][name], **r0["profile"][name],
                         **r0["checks"].get(name, {})}
        for v in out.values():
            v["vs_bare"] = v["tokens_per_s"] / out["bare"]["tokens_per_s"]
            v["best_vs_bare"] = out["bare"]["step_ms_min"] / v["step_ms_min"]  # least disturbed steps
            v["cpu_vs_bare"] = out["bare"]["cpu_ms_per_rank_median"] / v["cpu_ms_per_rank_median"]
        figures[case] = {"spec": asdict(spec), "ranks": ranks, "ep": ep, "global_tokens_per_step": global_tokens,
                         "variants": out,
                         # the most a gate can gain over bare while DeepSpeed's dispatch and experts run as they do
                         "cpu_ceiling_vs_bare": out["bare-free-gate"]["cpu_vs_bare"]}
    return figures


def resolve_granularity(args: argparse.Namespace) -> None:
    """`--granularity G` as the config's `moe.granularity`/`moe.expansion` (N = chi x rho, k = chi). Unless
    --hidden is given, fine-grained experts are the default's experts split G/2 ways: k x hidden (the
    width one token meets) stays 2 x 128, as the recipes size them (s3_mosei: 8 x 64 = one dense FFN)."""
    if args.granularity:
        args.experts, args.topk = args.granularity * args.expansion, args.granularity
        args.hidden = args.hidden or max(1, 2 * 128 // args.granularity)
    args.hidden = args.hidden or 128


def run(args: argparse.Namespace) -> int:
    for flag in ("repeats", "profile_steps"):  # the median and the table's shares need at least one step
        if getattr(args, flag) < 1:
            raise SystemExit(f"s3dist bench moe: --{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    ep = args.ep or args.ranks
    resolve_granularity(args)
    cases = ["fused", "single"] if args.case == "both" else [args.case]
    specs = {case: LayerSpec(list(MODALITIES if case == "fused" else MODALITIES[:1]), args.batch, args.steps,
                             args.d_model, args.experts, args.topk, args.hidden, args.capacity_factor,
                             expert_compute=args.expert_compute)
             for case in cases}
    figures = measure(specs, args.ranks, ep, warmup=args.warmup, repeats=args.repeats,
                      profile_steps=args.profile_steps, threads=args.threads)
    rows = []
    for case in cases:
        for name, v in figures[case]["variants"].items():
            rows.append({"case": case, "layer": name, "experts": specs[case].total_experts,
                         "tokens/s": v["tokens_per_s"], "ms/step": v["step_ms_median"], "vs bare": v["vs_bare"],
                         "best vs bare": v["best_vs_bare"],
                         "cpu ms/rank": v["cpu_ms_per_rank_median"], "cpu vs bare": v["cpu_vs_bare"],
                         "all-to-all": f"{100 * v['all_to_all_share']:.1f}%",
                         "all-reduce ms": v["all_reduce_ms"], "gate fwd ms": v["gate_forward_ms"],
                         "gate compute ms": v["gate_forward_compute_ms"],
                         "a2a calls": v["all_to_all_bytes_per_step"]["calls"],
                         "a2a MiB/rank": v["all_to_all_bytes_per_step"]["buffer_bytes"] / 2 ** 20})
    print_table(rows)
    print(f"{args.ranks} ranks, ep={ep}; median of {args.repeats} interleaved fwd+bwd steps after {args.warmup} "
          f"warm-up (best: ratio of the fastest steps; cpu: process CPU time per rank); shares from "
          f"{args.profile_steps} profiled steps (rank 0); load average {os.getloadavg()[0]:.1f}")
    figures["ratio_s3dist_vs_bare"] = {c: figures[c]["variants"]["s3dist"]["vs_bare"] for c in cases}
    figures["cpu_ratio_s3dist_vs_bare"] = {c: figures[c]["variants"]["s3dist"]["cpu_vs_bare"] for c in cases}
    figures["best_ratio_s3dist_vs_bare"] = {c: figures[c]["variants"]["s3dist"]["best_vs_bare"] for c in cases}
    figures["cpu_ceiling_vs_bare"] = {c: figures[c]["cpu_ceiling_vs_bare"] for c in cases}
    print("cpu ceiling vs bare (bare / bare with a free gate: the most any gate can gain here): "
          + ", ".join(f"{c} {figures[c]['cpu_ceiling_vs_bare']:.3f}" for c in cases))
    figures["load_average_1min"] = os.getloadavg()[0]  # other jobs on the machine make wall times noisy
    record("moe", figures, out=args.json or None)
    return 0
