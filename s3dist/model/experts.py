"""The expert MLP and the local experts of one DeepSpeed MoE layer computed as batched GEMMs.

`GroupedExperts` replaces DeepSpeed's `Experts` inside its `MOELayer` (gate, dispatch, all-to-all and
combine stay DeepSpeed's). DeepSpeed runs each local expert as its own small MLP in a Python loop, so a
layer dispatches a handful of ops per expert, forward and backward; with fine-grained experts (N = 16-48
per layer) on a host-bound GPU that loop, not the matmuls, is the cost. Here each projection of all
local experts is one `baddbmm` over the stacked per-expert weights. On CPU that pays only for small
per-expert GEMMs: larger ones ran faster as the loop (see `CPU_GROUPED_MAX_ROWS_X_HIDDEN`).

The parameters stay DeepSpeed's: one `ExpertMLP` (an `nn.Linear` pair) per local expert in
`deepspeed_experts`, with its expert-parallel flags (`allreduce=False`, `group_name`), so checkpoints
keep one file per expert by global index, resharding between ep sizes and the expert-data-parallel
gradient reduction are untouched. The weights are stacked per forward (one small copy per projection);
autograd hands each expert's slice of the gradient back to its own parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from torch import nn

# `moe.expert_compute=auto` on CPU: grouped only while one expert's hidden activation (rows x hidden
# elements) is at most this. Measured with `s3dist bench experts` (fwd+bwd of the local experts alone,
# 1 thread; BENCHMARKS.md "Host work per step, grouped local experts"): up to it the loop's per-expert
# dispatch dominates and grouped won (1.1-3x); from ~40k on the loop's per-expert GEMMs were faster
# (grouped at 0.7-0.85x: the [E, rows, hidden] intermediates leave the cache, and ep > 1 adds a
# transpose copy each way).
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
    one kernel; this is the expectation the GPU commands in BENCHMARKS.md are to check, not yet a
    measurement. On CPU: only below `CPU_GROUPED_MAX_ROWS_X_HIDDEN` (measured)."""
    if compute != "auto":
        return compute == "grouped"
    if num_local_experts < 2:
        return False
    return device.type == "cuda" or rows * hidden <= CPU_GROUPED_MAX_ROWS_X_HIDDEN


class GroupedExperts(Experts):
    """DeepSpeed's `Experts` (same parameters, names and flags) with a batched forward.

    `compute` is `moe.expert_compute`; the choice is made per call from the received buffer's shape,
    so evaluation batches and capacity changes pick their own path. 'loop' is DeepSpeed's forward
    unchanged (the reference the tests compare against).

    Capacity makes every expert's slice the same size ([ep, E, C, d]), so a plain batched GEMM (bmm) is
    the grouped GEMM here; torch's `_grouped_mm` pays for ragged groups, which this layout never has.
    """

    def __init__(self, expert: ExpertMLP, num_local_experts: int, expert_group_name: str | None,
                 compute: str = "auto") -> None:
        super().__init__(expert, num_local_experts, expert_group_name)
        self.compute = compute
        self.hidden = expert.fc1.out_features

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: [ep, E_local, C, d] as `MOELayer` lays out the received buffer; same shape out."""
        ep, e, c, d = inputs.shape
        if not use_grouped(self.compute, e, ep * c, self.hidden, inputs.device):
            return super().forward(inputs)
        # [E, ep * C, d]: each expert's rows from every source rank, one batch entry per expert. With
        # ep=1 the transpose is a view; otherwise it is the one copy the batched layout needs.
        x = inputs.transpose(0, 1).reshape(e, ep * c, d)
        w1, b1, w2, b2 = self._stacked()
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2))
        y = torch.baddbmm(b2.unsqueeze(1), F.gelu(h), w2.transpose(1, 2))
        return y.view(e, ep, c, d).transpose(0, 1)

    def _stacked(self) -> tuple[torch.Tensor, ...]:
        experts = self.deepspeed_experts
        return (torch.stack([x.fc1.weight for x in experts]), torch.stack([x.fc1.bias for x in experts]),
                torch.stack([x.fc2.weight for x in experts]), torch.stack([x.fc2.bias for x in experts]))


def install_grouped_experts(moe, compute: str) -> GroupedExperts:
    """Swap a freshly built `deepspeed.moe.layer.MoE`'s `Experts` for `GroupedExperts` (before experts are
    initialised or groups attached). The expert prototype is DeepSpeed's first deep copy."""
    old = moe.deepspeed_moe.experts
    new = GroupedExperts(old.deepspeed_experts[0], old.num_local_experts, moe.expert_group_name, compute)
    moe.deepspeed_moe.experts = new
    return new
