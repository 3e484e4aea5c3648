"""`s3dist bench plan`: an analytic model of expert-parallel communication and memory for a cluster.

What DeepSpeed's MoE moves (deepspeed 0.19, drop_tokens=True): per MoE layer and routing group each
rank builds a dense dispatch buffer [E, C, d] (E experts of the group, C slots per expert, zero
padded) and sends it through `all_to_all_single` with equal splits; the expert outputs come back
in a buffer of the same shape (combine); backward repeats both. So per rank and step:

    buffer  = E * C * d * bytes_per_element                     (one all-to-all)
    moved   = layers * groups * 4 * buffer                       (dispatch + combine, fwd + bwd)
    leaving = moved * (ep - 1) / ep                             (the rest stays on the rank)

with C = max(ceil(cf * k * S_m / N), min_capacity, 1): S_m the tokens of one modality on the rank
(the S3 router sizes every modality's block alike, from the largest), N experts per modality, k
routes per token. The S3 router fuses all modalities into one group (E = M * N, or N shared); the
plain top-k baseline has one group per modality (E = N). This is exact, not an estimate: the test
suite checks it against the bytes counted in a 2-rank run (`s3dist bench moe` / `bench train`).

Time: expert-parallel groups are consecutive ranks, so a group of ep <= G GPUs stays inside a node
(NVLink); a larger one sends (ep - G) / (ep - 1) of what leaves a rank over the inter-node network.
One all-to-all takes latency + max(NVLink bytes / NVLink bandwidth, network bytes / network bandwidth)
per GPU. Compute is estimated from FLOPs at a given utilisation of the GPU's peak (or given with
--compute-ms); the predicted communication share is comm / (comm + compute), assuming no overlap
(DeepSpeed's MoE does not overlap the all-to-all with expert compute).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

from s3dist.bench.common import at_least, positive, print_table, record


@dataclass
class PlanSpec:
    nodes: int = 1
    gpus_per_node: int = 2
    ep: int = 2
    modalities: int = 3
    batch_per_gpu: int = 64            # samples per GPU per step
    views: int = 2                     # Stage 1 encodes two augmented views in one call
    seq_len: int = 16                  # tokens per sample and modality (time steps; 1 for pooled tokens)
    tokens_per_gpu: int = 0            # override: MoE tokens per GPU per layer call, all modalities
    d_model: int = 64
    experts: int = 4                   # N, experts per modality
    topk: int = 2
    expert_hidden: int = 128
    layers: int = 1                    # MoE layers
    capacity_factor: float = 1.25
    min_capacity: int = 4
    kind: str = "s3"                   # s3: one fused group; topk: one group per modality
    shared_experts: bool = False
    bytes_per_element: int = 4         # 4 fp32, 2 bf16
    input_dims: tuple = (24, 16, 12)   # feature width per modality (stems' FLOPs)
    nvlink_gbps: float = 3600.0        # per GPU, per direction, Gbit/s (H100 NVLink4: 450 GB/s)
    bandwidth_gbps: float = 400.0      # inter-node per GPU, Gbit/s (one NDR InfiniBand NIC per GPU)
    nvlink_latency_us: float = 10.0    # per all-to-all inside a node
    network_latency_us: float = 25.0   # per all-to-all that crosses nodes
    peak_tflops: float = 989.0         # H100 SXM dense bf16
    mfu: float = 0.3                   # assumed model FLOPs utilisation
    compute_ms: float = 0.0            # override the FLOPs-based compute time
    zero_stage: int = 1
    dataset_samples: int = 0           # for per-epoch figures (0: none)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def tokens_per_modality(self) -> int:
        if self.tokens_per_gpu:
            return math.ceil(self.tokens_per_gpu / self.modalities)
        return self.views * self.batch_per_gpu * self.seq_len


def groups_and_experts(spec: PlanSpec) -> tuple[int, int]:
    """(routing groups per layer, experts per group)."""
    if spec.kind == "s3":
        return 1, (spec.experts if spec.shared_experts else spec.experts * spec.modalities)
    return spec.modalities, spec.experts


def capacity(spec: PlanSpec) -> int:
    """Slots per expert per rank, as S3Router / DeepSpeed's top-k gate size it with drop_tokens=True."""
    cap = math.ceil(spec.capacity_factor * spec.topk * spec.tokens_per_modality / spec.experts)
    return max(cap, spec.min_capacity, 1)


def alltoall_bytes(spec: PlanSpec) -> dict:
    """Per rank and step: all-to-all calls, bytes handed to them, bytes leaving the rank."""
    groups, experts = groups_and_experts(spec)
    buffer = experts * capacity(spec) * spec.d_model * spec.bytes_per_element
    calls = spec.layers * groups * 4 if spec.ep > 1 else 0
    moved = calls * buffer
    return {"calls": calls, "buffer_bytes": moved, "offrank_bytes": moved * (spec.ep - 1) // spec.ep,
            "bytes_per_call": buffer}


def expert_params(spec: PlanSpec) -> int:
    return 2 * spec.d_model * spec.expert_hidden + spec.expert_hidden + spec.d_model


def memory(spec: PlanSpec) -> dict:
    """Expert bytes per GPU: weights, and weights + grads + AdamW states (ZeRO-1/2 shard the states,
    and for ZeRO-2 also the grads, over the expert-data-parallel group)."""
    groups, experts = groups_and_experts(spec)
    local = spec.layers * groups * experts // spec.ep
    params = local * expert_params(spec)
    expert_dp = spec.world // spec.ep
    weights = params * spec.bytes_per_element
    grads = params * spec.bytes_per_element / (expert_dp if spec.zero_stage >= 2 else 1)
    # AdamW: two fp32 moments, plus an fp32 master copy when training in bf16
    states = params * (8 + (4 if spec.bytes_per_element == 2 else 0)) / (expert_dp if spec.zero_stage >= 1 else 1)
    return {"local_experts": local, "expert_params_per_gpu": params, "expert_weight_bytes": weights,
            "expert_training_bytes": int(weights + grads + states)}


def flops_per_gpu(spec: PlanSpec) -> float:
    """Training FLOPs per GPU and step (forward x 3): stems, routers, experts on their full capacity
    buffers (DeepSpeed runs experts on every slot, padding included)."""
    d, s_m = spec.d_model, spec.tokens_per_modality
    groups, experts = groups_and_experts(spec)
    dims = list(spec.input_dims) + [spec.input_dims[-1]] * max(0, spec.modalities - len(spec.input_dims))
    stems = sum(2 * s_m * (din * d + 3 * d + 4 * d * d) for din in dims[:spec.modalities])
    router = spec.layers * 2 * s_m * spec.modalities * d * (experts if spec.kind == "s3" else spec.experts)
    expert = spec.layers * groups * experts * capacity(spec) * 2 * expert_params(spec)
    return 3.0 * (stems + router + expert)


def predict(spec: PlanSpec) -> dict:
    a2a = alltoall_bytes(spec)
    g = spec.gpus_per_node
    crosses = spec.ep > g
    leaving = a2a["offrank_bytes"]
    network_share = (spec.ep - g) / (spec.ep - 1) if crosses else 0.0
    network_bytes = leaving * network_share
    nvlink_bytes = leaving - network_bytes
    latency = (spec.network_latency_us if crosses else spec.nvlink_latency_us) * 1e-6
    bw_time = max(nvlink_bytes * 8 / (spec.nvlink_gbps * 1e9), network_bytes * 8 / (spec.bandwidth_gbps * 1e9))
    comm_s = a2a["calls"] * latency + bw_time if a2a["calls"] else 0.0
    flops = flops_per_gpu(spec)
    compute_s = spec.compute_ms / 1e3 if spec.compute_ms else flops / (spec.peak_tflops * 1e12 * spec.mfu)
    out = {"world": spec.world, "expert_dp": spec.world // spec.ep, "capacity": capacity(spec),
           "tokens_per_modality_per_gpu": spec.tokens_per_modality, "all_to_all": a2a,
           "nvlink_bytes_per_gpu": nvlink_bytes, "network_bytes_per_gpu": network_bytes,
           "comm_ms": 1e3 * comm_s, "comm_latency_ms": 1e3 * a2a["calls"] * latency, "compute_ms": 1e3 * compute_s,
           "flops_per_gpu": flops, "comm_share": comm_s / (comm_s + compute_s) if comm_s + compute_s else 0.0,
           **memory(spec)}
    if spec.dataset_samples:
        steps = math.ceil(spec.dataset_samples / (spec.batch_per_gpu * spec.world))
        out["steps_per_epoch"] = steps
        out["epoch_seconds"] = steps * (comm_s + compute_s)
        out["epoch_network_bytes_per_gpu"] = steps * network_bytes
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PlanSpec()
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node)
    p.add_argument("--ep", type=int, default=d.ep, help="expert-parallel size (consecutive ranks)")
    p.add_argument("--modalities", type=at_least(1), default=d.modalities)
    p.add_argument("--batch-per-gpu", type=at_least(1), default=d.batch_per_gpu, help="samples per GPU per step")
    p.add_argument("--views", type=at_least(1), default=d.views, help="encoder passes per sample (Stage 1: 2)")
    p.add_argument("--seq-len", type=at_least(1), default=d.seq_len, help="tokens per sample and modality")
    p.add_argument("--tokens-per-gpu", type=at_least(0), default=0,
                   help="MoE tokens per GPU per layer call over all modalities (overrides batch x views x seq-len)")
    p.add_argument("--d-model", type=at_least(1), default=d.d_model)
    p.add_argument("--experts", type=at_least(1), default=d.experts, help="experts per modality (N)")
    p.add_argument("--topk", type=at_least(1), default=d.topk)
    p.add_argument("--expert-hidden", type=at_least(1), default=d.expert_hidden)
    p.add_argument("--layers", type=at_least(1), default=d.layers, help="MoE layers")
    p.add_argument("--capacity-factor", type=positive, default=d.capacity_factor)
    p.add_argument("--min-capacity", type=at_least(0), default=d.min_capacity)
    p.add_argument("--kind", choices=("s3", "topk"), default=d.kind)
    p.add_argument("--shared-experts", action="store_true")
    p.add_argument("--bytes-per-element", type=int, choices=(2, 4), default=d.bytes_per_element)
    p.add_argument("--input-dims", default=",".join(map(str, d.input_dims)), help="feature widths, e.g. 300,74,35")
    p.add_argument("--nvlink-gbps", type=positive, default=d.nvlink_gbps, help="intra-node, per GPU, Gbit/s")
    p.add_argument("--bandwidth-gbps", type=positive, default=d.bandwidth_gbps, help="inter-node, per GPU, Gbit/s")
    p.add_argument("--nvlink-latency-us", type=float, default=d.nvlink_latency_us)
    p.add_argument("--network-latency-us", type=float, default=d.network_latency_us)
    p.add_argument("--peak-tflops", type=positive, default=d.peak_tflops)
    p.add_argument("--mfu", type=positive, default=d.mfu)
    p.add_argument("--compute-ms", type=float, default=0.0, help="measured compute per step (overrides FLOPs)")
    p.add_argument("--zero-stage", type=int, default=d.zero_stage)
    p.add_argument("--dataset-samples", type=at_least(0), default=0, help="training samples, for per-epoch figures")


def spec_from_args(args: argparse.Namespace) -> PlanSpec:
    spec = PlanSpec(**{k: v for k, v in vars(args).items() if k in PlanSpec.__dataclass_fields__ and k != "input_dims"})
    spec.input_dims = tuple(int(x) for x in args.input_dims.split(",") if x)
    for flag in ("nodes", "gpus_per_node", "ep"):
        if getattr(spec, flag) < 1:
            raise SystemExit(f"s3dist bench plan: --{flag.replace('_', '-')} {getattr(spec, flag)} must be >= 1")
    if spec.world % spec.ep:
        raise SystemExit(f"s3dist bench plan: --ep {spec.ep} must divide the world {spec.world} "
                         f"(--nodes x --gpus-per-node)")
    _, experts = groups_and_experts(spec)
    if experts % spec.ep:
        raise SystemExit(f"s3dist bench plan: --ep {spec.ep} must divide the experts per routing group ({experts})")
    return spec


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    pred = predict(spec)
    a2a = pred["all_to_all"]
    mib = 2 ** 20
    rows = [
        {"figure": "world = ep x expert-dp", "value": f"{pred['world']} = {spec.ep} x {pred['expert_dp']}"},
        {"figure": "tokens per modality per GPU per layer", "value": pred["tokens_per_modality_per_gpu"]},
        {"figure": "capacity (slots per expert)", "value": pred["capacity"]},
        {"figure": "all-to-all calls per step", "value": a2a["calls"]},
        {"figure": "MiB per all-to-all per GPU", "value": a2a["bytes_per_call"] / mib},
        {"figure": "MiB into all-to-all per GPU per step", "value": a2a["buffer_bytes"] / mib},
        {"figure": "MiB leaving each GPU per step", "value": a2a["offrank_bytes"] / mib},
        {"figure": "  of which over NVLink", "value": pred["nvlink_bytes_per_gpu"] / mib},
        {"figure": "  of which over the network", "value": pred["network_bytes_per_gpu"] / mib},
        {"figure": "local experts per GPU (all layers)", "value": pred["local_experts"]},
        {"figure": "expert weights MiB per GPU", "value": pred["expert_weight_bytes"] / mib},
        {"figure": "expert weights+grads+AdamW MiB per GPU", "value": pred["expert_training_bytes"] / mib},
        {"figure": "all-to-all ms per step (latency part)", "value": f"{pred['comm_ms']:.3f} "
                                                                   f"({pred['comm_latency_ms']:.3f})"},
        {"figure": "compute ms per step", "value": pred["compute_ms"]},
        {"figure": "predicted all-to-all share of step", "value": f"{100 * pred['comm_share']:.1f}%"},
    ]
    if "steps_per_epoch" in pred:
        rows += [{"figure": "steps per epoch", "value": pred["steps_per_epoch"]},
                 {"figure": "seconds per epoch", "value": pred["epoch_seconds"]}]
    print_table(rows)
    record("plan", {"spec": asdict(spec), "prediction": pred}, out=args.json or None)
    return 0
