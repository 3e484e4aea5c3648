"""Stage 3, Sparsification: keep the top fraction p of routing units in each MoE layer, prune the rest.

The unit (`stages.prune_unit`) is the paper's selected top-k **(token, expert) pair**, ranked by gate
probability, or the earlier (sample, expert) pair ranked by mean gate probability. Pruning is applied
per MoE layer (`stages.prune_layers`: all or the last) and per modality, as one threshold on the
unit score: a unit is kept iff its score >= the threshold. Two ways to set the threshold
(`stages.prune_threshold`):

* `batch` (`BatchSparsifier`, the paper's rule): the ceil(p * n)-th largest of the n unit scores of
  the *global* batch; every rank all-gathers the scores, so all ranks apply the threshold a single
  process holding the whole batch would.
* `calibrated` (`calibrate` / `calibrate_sweep`, then `FixedSparsifier`): each layer's threshold is fixed
  once on the training split, layer by layer (layer l's scores are collected with layers < l already
  pruned), then applied to every split. A sample's representation then depends on nothing but the
  sample: not on its batch-mates, the evaluation batch size or the number of ranks.

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


def _layer_scores(model, batches, fixed: dict[int, dict[str, float]], target: int, unit: str, renormalize: bool,
                  device) -> dict[str, torch.Tensor]:
    """Per modality, the unit scores of layer `target` over all of `batches` and all ranks, with the layers in
    `fixed` pruned at their thresholds. Each pass runs the encoder only up to that layer's router input, and
    every rank stops at the same layer, so no rank waits in a collective of a layer the others skip."""
    before = FixedSparsifier(fixed, unit, renormalize)
    scores: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        batch = batch.to(device)
        x, valid = model.ffn_input(batch.features, batch.masks, target, sparsifier=before)
        for m, s in model.layers[target].prune_scores(x, valid, unit).items():
            scores.setdefault(m, []).append(s.float().cpu())  # on the CPU: a whole training split's worth
    out = {}
    for m in model.modalities:  # same collective order on every rank
        local = torch.cat(scores[m]) if scores.get(m) else torch.zeros(0)
        out[m], _ = _gather_rows(local.to(collective_device()))
    return out


@torch.no_grad()
def calibrate_sweep(model, batches, keep_fractions, unit: str, layers: set[int], device,
                    renormalize: bool = False) -> dict[float, dict[int, dict[str, float]]]:
    """{p: per pruned layer and modality, the threshold keeping the top p of the training split's units}.

    `batches` is a re-iterable of `Batch` (this rank's part of the training split; every rank calls this
    with the same number of batches, as the MoE layers are collectives). Layer by layer: layer l's scores
    are those the encoder produces with layers < l already pruned, so each threshold keeps p of the units
    that really reach that layer. Scores are gathered over all ranks, so the thresholds are the same for
    any number of ranks.

    One pass over `batches` per (p, pruned layer), each stopping at its layer's router, except that the first
    pruned layer's scores do not depend on p (nothing before it is pruned): one pass serves every p."""
    order = sorted(layers)
    if not keep_fractions or not order:
        return {p: {} for p in keep_fractions}
    model.eval()
    first = _layer_scores(model, batches, {}, order[0], unit, renormalize, device)
    out = {p: {order[0]: {m: threshold(s, p) for m, s in first.items()}} for p in keep_fractions}
    del first  # a training split's worth of scores
    for p, fixed in out.items():
        for layer in order[1:]:
            scores = _layer_scores(model, batches, fixed, layer, unit, renormalize, device)
            fixed[layer] = {m: threshold(s, p) for m, s in scores.items()}
    return out


def calibrate(model, batches, keep_fraction: float, unit: str, layers: set[int], device,
              renormalize: bool = False) -> dict[int, dict[str, float]]:
    """The thresholds of `calibrate_sweep` for one keep fraction p."""
    return calibrate_sweep(model, batches, [keep_fraction], unit, layers, device, renormalize)[keep_fraction]


def encode_threshold(t: float):
    """A threshold as JSON, which has no infinities (eval.json, an export's config.json): +inf (nothing kept)
    is null, -inf (everything kept) the string '-inf'."""
    return None if t == math.inf else ("-inf" if t == -math.inf else float(t))


def decode_threshold(t) -> float:
    return math.inf if t is None else (-math.inf if t == "-inf" else float(t))


def stage3_record(stages, num_layers: int, by_p: dict | None = None) -> dict:
    """What eval.json and an export record about Stage 3 (`stages`: the run's `StagesConfig`): the rule, the
    pruned layers, and for each p with a `FixedSparsifier` in `by_p` its calibrated thresholds
    (`encode_threshold`)."""
    out = {"prune_unit": stages.prune_unit, "prune_layers": stages.prune_layers,
           "prune_threshold": stages.prune_threshold, "prune_renormalize": stages.prune_renormalize,
           "pruned_layer_indices": sorted(pruned_layers(num_layers, stages.prune_layers))}
    fixed = {p: sp.thresholds for p, sp in (by_p or {}).items() if isinstance(sp, FixedSparsifier)}
    if fixed:
        out["thresholds"] = {str(p): {str(layer): {m: encode_threshold(t) for m, t in per.items()}
                                      for layer, per in th.items()}
                             for p, th in fixed.items()}
    return out
