"""Stage 3, Sparsification: keep the top fraction p of (sample, expert) routing pairs.

Pairs are ranked over the *global* batch: every rank all-gathers the scores, so all ranks apply one
threshold and keep exactly the pairs a single process holding the whole batch would keep. Ties are
broken by position in the gathered order (rank-major, then sample, then expert), which is the order
of the batch itself, so the result does not depend on how the batch is split.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather along dim 0 with unequal row counts (evaluation batches may be uneven or empty)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, [x.shape[0]]
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = max(sizes)
    buf = torch.zeros((pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
    buf[:x.shape[0]] = x
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sizes


def keep_mask(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """1 for the top ceil(p * numel) entries of `scores` (ties by position), else 0."""
    flat = scores.reshape(-1)
    n_keep = min(flat.numel(), math.ceil(keep_fraction * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros_like(flat)
    mask[order[:n_keep]] = 1.0
    return mask.view_as(scores)


def global_keep_masks(scores: dict[str, torch.Tensor], keep_fraction: float) -> dict[str, torch.Tensor]:
    """Per modality: gather [B_r, N] scores from all ranks, keep the global top p, return this rank's rows."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out = {}
    for m in sorted(scores):  # same collective order on every rank
        allscores, sizes = _gather_rows(scores[m].float())
        mask = keep_mask(allscores, keep_fraction)
        start = sum(sizes[:rank])
        out[m] = mask[start:start + sizes[rank]]
    return out
