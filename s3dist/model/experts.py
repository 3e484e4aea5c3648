"""The local experts of one DeepSpeed MoE layer: stacked parameters, computed as batched GEMMs.

`GroupedExperts` replaces DeepSpeed's `Experts` inside its `MOELayer` (gate, dispatch, all-to-all and
combine stay DeepSpeed's). DeepSpeed keeps each local expert as its own `nn.Linear` pair and runs them in
a Python loop. That costs twice per expert: the loop dispatches a small MLP's worth of ops per expert,
forward and backward, and DeepSpeed's ZeRO optimizer handles every parameter *tensor* on its own each
step (gradient-bucket copy, norm, copy-back: ~40 ops per tensor per step). With fine-grained experts
(N = 16-48 per layer) both, not the matmuls, are the cost of a host-bound step.

So the parameters are stacked, as torchtitan's and DeepSpeed's own grouped experts (AutoEP) keep them:
one tensor per projection for all local experts of the layer (`w1` [E, hidden, d], `b1` [E, hidden],
`w2` [E, d, hidden], `b2` [E, d]) with DeepSpeed's expert-parallel flags (`allreduce=False`,
`group_name`), so ZeRO and the expert-data-parallel gradient reduction treat them as expert parameters.
The state dict is still DeepSpeed's per-expert one (`deepspeed_experts.{i}.fc1.weight`, ...): hooks
(`s3dist.model.stacked`) write each expert's slices under those names and stack them back on load, so
checkpoints keep one file per expert by global index, resharding between ep sizes and export are unchanged.

Each projection of all local experts is one `baddbmm`; on CPU that pays only for small per-expert GEMMs,
larger ones ran faster as the loop (see `CPU_GROUPED_MAX_ROWS_X_HIDDEN`), which runs over the slices of
the same stacked parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from s3dist.model.stacked import mark_stacked, register_per_copy_state, stacked_linear

# `moe.expert_compute=auto` on CPU: grouped only while one expert's hidden activation (rows x hidden
# elements) is at most this. Below it the loop's per-expert dispatch dominates; above it the loop's
# per-expert GEMMs are faster, because the batched [E, rows, hidden] intermediates leave the cache and
# ep > 1 adds a transpose copy each way. Where the line lies was measured with `s3dist bench experts`
# (BENCHMARKS.md "Host work per step, grouped local experts").
CPU_GROUPED_MAX_ROWS_X_HIDDEN = 32_768


class ExpertMLP(nn.Module):
    """One expert: d_model -> hidden -> d_model, mapping into the shared latent space."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def use_grouped(compute: str, num_local_experts: int, rows: int, hidden: int, device: torch.device) -> bool:
    """Whether `moe.expert_compute=compute` runs this layer's local experts as grouped GEMMs, for
    `rows` rows per expert (ep x capacity) of a `hidden`-wide expert on `device`.

    'auto' on CUDA: always (two or more experts). A launch there costs microseconds of host time per
    kernel whatever its size, the regime where the loop is worst, and cuBLAS runs a batched GEMM as
    one kernel (BENCHMARKS.md "GPU" holds the commands that measure it). On CPU: only below
    `CPU_GROUPED_MAX_ROWS_X_HIDDEN`."""
    if compute != "auto":
        return compute == "grouped"
    if num_local_experts < 2:
        return False
    return device.type == "cuda" or rows * hidden <= CPU_GROUPED_MAX_ROWS_X_HIDDEN


# The stacked parameters and the per-expert state-dict names DeepSpeed's checkpoint files key on.
PER_EXPERT_NAMES = {"w1": "fc1.weight", "b1": "fc1.bias", "w2": "fc2.weight", "b2": "fc2.bias"}


def _per_expert_names(experts: GroupedExperts) -> dict[str, list[str]]:
    """DeepSpeed's per-expert keys (local index i, as its `load_moe_state_dict` renames them)."""
    return {name: [f"deepspeed_experts.{i}.{key}" for i in range(experts.num_local_experts)]
            for name, key in PER_EXPERT_NAMES.items()}


class GroupedExperts(nn.Module):
    """The local experts of one layer as stacked parameters (see the module docstring), with a batched
    forward and DeepSpeed's per-expert state dict.

    `compute` is `moe.expert_compute`; the choice is made per call from the received buffer's shape,
    so evaluation batches and capacity changes pick their own path. 'loop' is DeepSpeed's per-expert
    forward over the stacked parameters' slices (the reference the tests compare against).

    Capacity makes every expert's slice the same size ([ep, E, C, d]), so a plain batched GEMM (bmm) is
    the grouped GEMM here; torch's `_grouped_mm` pays for ragged groups, which this layout never has.
    """

    def __init__(self, d_model: int, hidden: int, num_local_experts: int, expert_group_name: str | None,
                 compute: str = "auto") -> None:
        super().__init__()
        e = num_local_experts
        self.num_local_experts = e
        self.compute = compute
        self.hidden = hidden
        self.w1 = nn.Parameter(torch.empty(e, hidden, d_model))
        self.b1 = nn.Parameter(torch.empty(e, hidden))
        self.w2 = nn.Parameter(torch.empty(e, d_model, hidden))
        self.b2 = nn.Parameter(torch.empty(e, d_model))
        for p in self.parameters():  # DeepSpeed's expert-parallel flags, as `deepspeed.moe.experts.Experts` sets
            p.allreduce = False
            p.group_name = expert_group_name
        mark_stacked(*self.parameters())
        register_per_copy_state(self, _per_expert_names, "was it written with another number of experts, or "
                                "another expert-parallel size?")

    @torch.no_grad()
    def load_expert_(self, i: int, expert: ExpertMLP) -> None:
        """Copy one `ExpertMLP`'s weights into local expert `i`."""
        for name, key in PER_EXPERT_NAMES.items():
            getattr(self, name)[i].copy_(expert.get_parameter(key))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: [ep, E_local, C, d] as `MOELayer` lays out the received buffer; same shape out."""
        ep, e, c, d = inputs.shape
        if not use_grouped(self.compute, e, ep * c, self.hidden, inputs.device):
            # DeepSpeed's loop (`Experts.forward`): one chunk per expert, outputs concatenated. `unbind`'s
            # backward stacks the experts' gradients into each parameter in one op.
            slices = zip(inputs.chunk(e, dim=1), self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0),
                         self.b2.unbind(0))
            return torch.cat([F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) for x, w1, b1, w2, b2 in slices], dim=1)
        # [E, ep * C, d]: each expert's rows from every source rank, one batch entry per expert. With
        # ep=1 the transpose is a view; otherwise it is the one copy the batched layout needs.
        x = inputs.transpose(0, 1).reshape(e, ep * c, d)
        y = stacked_linear(F.gelu(stacked_linear(x, self.w1, self.b1)), self.w2, self.b2)
        return y.view(e, ep, c, d).transpose(0, 1)


def install_grouped_experts(moe, compute: str) -> GroupedExperts:
    """Swap a freshly built `deepspeed.moe.layer.MoE`'s `Experts` for `GroupedExperts` (before groups are
    attached), starting from DeepSpeed's copies of the expert prototype."""
    old = moe.deepspeed_moe.experts
    proto = old.deepspeed_experts[0]
    new = GroupedExperts(proto.fc1.in_features, proto.fc1.out_features, old.num_local_experts,
                         moe.expert_group_name, compute)
    for i, expert in enumerate(old.deepspeed_experts):
        new.load_expert_(i, expert)
    moe.deepspeed_moe.experts = new
    return new
