"""Stage 3, Sparsification: keep the top fraction p of routing units in each MoE layer, prune the rest.

The unit (`stages.prune_unit`) is the paper's selected top-k **(token, expert) pair**, ranked by gate
probability, or the earlier (sample, expert) pair ranked by mean gate probability. Pruning is applied
per MoE layer (`stages.prune_layers`: all or the last) and per modality, as one threshold on the
unit score: a unit is kept iff its score >= the threshold. Two ways to set the threshold
(`stages.prune_threshold`):

* `batch` (`BatchSparsifier`, the paper's rule): the ceil(p * n)-th largest of the n unit scores of
  the *global* batch; every rank all-gathers the scores, so all ranks apply the threshold a single
  process holding the whole batch would.
* `calibrated` (`calibrate`, then `FixedSparsifier`): each layer's threshold is fixed once on the
  training split, layer by layer (layer l's scores are collected with layers < l already pruned), then
  applied to every split. A sample's representation then depends on nothing but the sample: not on
  its batch-mates, the evaluation batch size or the number of ranks.

p = 0 prunes every unit (threshold +inf): each pruned layer then adds nothing to the residual stream.
Ties at the threshold are kept.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from s3dist.dist import collective_device
from s3dist.model.router import PruneSpec


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


def threshold(scores: torch.Tensor, keep_fraction: float) -> float:
    """A score that separates the top ceil(p * n) of `scores` (1-D) from the rest: -inf keeps all, +inf none.

    It is the midpoint between the last kept and the first pruned score, not the last kept score itself:
    the router recomputes each score in its own forward (another matmul shape, another rank), and a
    threshold equal to a score would flip that unit on the last bit. Tied scores at the cut are kept."""
    n = scores.numel()
    n_keep = min(n, math.ceil(keep_fraction * n - 1e-9))
    if n_keep <= 0:
        return math.inf
    if n_keep >= n:
        return -math.inf
    top = torch.topk(scores.float(), n_keep + 1).values
    return float((top[-2] + top[-1]) / 2)


def pruned_layers(num_layers: int, which: str) -> set[int]:
    return set(range(num_layers)) if which == "all" else {num_layers - 1}


class BatchSparsifier:
    """The paper's rule: per batch, per layer and modality, keep the global batch's top p units."""

    def __init__(self, keep_fraction: float, unit: str, layers: set[int], renormalize: bool = False) -> None:
        self.p, self.unit, self.layers, self.renormalize = keep_fraction, unit, layers, renormalize

    def prune_spec(self, layer, moe, x, valid) -> PruneSpec | None:
        if layer not in self.layers:
            return None
        scores = moe.prune_scores(x, valid, self.unit)
        thr = {}
        for m in sorted(scores):  # same collective order on every rank
            everyone, _ = _gather_rows(scores[m].float())
            thr[m] = threshold(everyone, self.p)
        return PruneSpec(self.unit, thr, self.renormalize)


class FixedSparsifier:
    """Apply fixed per-(layer, modality) thresholds; layers without one are not pruned."""

    def __init__(self, thresholds: dict[int, dict[str, float]], unit: str, renormalize: bool = False) -> None:
        self.thresholds, self.unit, self.renormalize = thresholds, unit, renormalize

    def prune_spec(self, layer, moe, x, valid) -> PruneSpec | None:
        if layer not in self.thresholds:
            return None
        return PruneSpec(self.unit, dict(self.thresholds[layer]), self.renormalize)


class _Recorder(FixedSparsifier):
    """Calibration pass for one layer: prunes the layers before it with their fixed thresholds and
    collects the unit scores of `target` (on the CPU: a whole training split's worth)."""

    def __init__(self, fixed: dict[int, dict[str, float]], target: int, unit: str, renormalize: bool) -> None:
        super().__init__(fixed, unit, renormalize)
        self.target = target
        self.scores: dict[str, list[torch.Tensor]] = {}

    def prune_spec(self, layer, moe, x, valid) -> PruneSpec | None:
        if layer == self.target:
            for m, s in moe.prune_scores(x, valid, self.unit).items():
                self.scores.setdefault(m, []).append(s.float().cpu())
            return None
        return super().prune_spec(layer, moe, x, valid)


@torch.no_grad()
def calibrate(model, batches, keep_fraction: float, unit: str, layers: set[int], device,
              renormalize: bool = False) -> dict[int, dict[str, float]]:
    """Per pruned layer and modality, the threshold keeping the top p of the training split's units.

    `batches` is a re-iterable of `Batch` (this rank's part of the training split; every rank calls this
    with the same number of batches, as the MoE layers are collectives). Layer by layer: layer l's scores
    are those the encoder produces with layers < l already pruned, so each threshold keeps p of the units
    that really reach that layer. Scores are gathered over all ranks, so the thresholds are the same for
    any number of ranks."""
    model.eval()
    fixed: dict[int, dict[str, float]] = {}
    for layer in sorted(layers):
        rec = _Recorder(fixed, layer, unit, renormalize)
        for batch in batches:
            batch = batch.to(device)
            model(batch.features, batch.masks, sparsifier=rec)
        fixed[layer] = {}
        for m in model.modalities:  # same collective order on every rank
            local = torch.cat(rec.scores.get(m, [])) if rec.scores.get(m) else torch.zeros(0)
            everyone, _ = _gather_rows(local.to(collective_device()))
            fixed[layer][m] = threshold(everyone, keep_fraction)
    return fixed
