"""The loss primitives of S3: InfoNCE, cross-modal SupCon, vMF compactness, routing compactness.

Negatives come from the *global* batch: embeddings are all-gathered across data-parallel ranks with
gradient (torch.distributed.nn), as large-scale CLIP training does, so the contrastive problem does
not shrink when the same global batch is split over more ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_single(out: torch.Tensor, x: torch.Tensor) -> None:
    """`torch.distributed.all_gather_single` (torch >= 2.13, where `all_gather_into_tensor` became a
    deprecated alias that warns on every call), or `all_gather_into_tensor` on the older torch releases
    pyproject.toml admits: same arguments, same result."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal row counts on every rank); the backward hands each rank the sum over
    ranks of the gradient of its own rows. Written on the plain collectives (`_all_gather_single`,
    `all_reduce`): torch's `distributed.nn.functional.all_gather` is deprecated and warns on every call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rows, ctx.rank = x.shape[0], rank
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # tiny ([world * B, d]); gloo has no reduce-scatter
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's slice."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def unit_and_global(embeddings: dict) -> tuple[dict, dict]:
    """Each embedding L2-normalised in fp32 (also under bf16), and its global batch, all of them in one
    all-gather: a stage's contrastive terms reuse the same few embeddings, so gathering each once, together,
    replaces two gathers per term (and two all-reduces in backward) with one of each per step. The
    embeddings are stacked ([B, K, d]) and normalised together too, so they must share one shape; every
    rank must pass the same keys with the same row count."""
    if not embeddings:
        return {}, {}
    shapes = {k: tuple(v.shape) for k, v in embeddings.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the contrastive terms take embeddings of one shape, got {shapes}")
    keys = list(embeddings)
    unit = F.normalize(torch.stack([embeddings[k] for k in keys], dim=1).float(), dim=-1)   # [B, K, d]
    glob = gather_with_grad(unit) if _world()[1] > 1 else unit                             # [world B, K, d]
    return dict(zip(keys, unit.unbind(1))), dict(zip(keys, glob.unbind(1)))


def _pair_logits(unit: dict, glob: dict, directed: list[tuple], temperature: float) -> torch.Tensor:
    """[P, B, world B]: for each directed pair (a, b), a's unit rows against b's global batch, over the
    temperature; all pairs in one batched matmul."""
    anchors = torch.stack([unit[a] for a, _ in directed])                                   # [P, B, d]
    candidates = torch.stack([glob[b] for _, b in directed])                                # [P, world B, d]
    return torch.bmm(anchors, candidates.transpose(1, 2)) / temperature


def info_nce_pairs(unit: dict, glob: dict, pairs: list[tuple], temperature: float) -> torch.Tensor:
    """The symmetric InfoNCE of each pair (x, y) of `unit_and_global`'s keys, as a [len(pairs)] tensor:
    x's row i and y's row i are positives, every other global-batch row is a negative. All pairs and both
    directions are one batched matmul and one cross-entropy (Stage 1 has 3-6 pairs: a few ops instead of
    a dozen per pair)."""
    if not pairs:
        raise ValueError("info_nce_pairs needs at least one pair")
    logits = _pair_logits(unit, glob, pairs + [(y, x) for x, y in pairs], temperature)  # both directions
    n, b, g = logits.shape
    target = (torch.arange(b, device=logits.device) + _world()[0] * b).repeat(n)         # the positive's global row
    per_row = F.cross_entropy(logits.reshape(n * b, g), target, reduction="none")
    return 0.5 * per_row.view(2, len(pairs), b).mean(-1).sum(0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: a[i] and b[i] are positives; every other global-batch row is a negative."""
    unit, glob = unit_and_global({"a": a, "b": b})
    return info_nce_pairs(unit, glob, [("a", "b")], temperature)[0]


def global_labels(labels: torch.Tensor) -> torch.Tensor:
    """`labels` of the whole global batch (float; [B] class ids or [B, K] multi-hot), rank-major."""
    return gather_with_grad(labels.float()) if _world()[1] > 1 else labels.float()


def sup_con(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-modal supervised contrastive loss (Khosla et al.): anchors from `a`, candidates from `b`
    (global batch). `labels` [B]: every `b` row with the anchor's label is a positive. `labels` [B, K]
    multi-hot (e.g. generating concepts): a row is positive with weight |c_i & c_j| / |c_i | c_j|
    (Jaccard), the usual multi-label generalisation; with one-hot rows it is the [B] case."""
    unit, glob = unit_and_global({"a": a, "b": b})
    return sup_con_pairs(unit, glob, [("a", "b")], labels, global_labels(labels), temperature)[0]


def sup_con_pairs(unit: dict, glob: dict, directed: list[tuple], labels: torch.Tensor, glabels: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """`sup_con` of each directed pair (a, b) of `unit_and_global`'s keys (anchors a, candidates b's global
    batch), with `glabels` the global batch's labels (`global_labels`), as a [len(directed)] tensor. The
    positive weights depend on the labels alone, so they are built once; all pairs are one batched matmul."""
    if labels.dim() == 1:
        pos = (labels.float().unsqueeze(1) == glabels.unsqueeze(0)).float()
    else:
        c, gc = labels.float(), glabels
        inter = c @ gc.t()
        union = c.sum(1, keepdim=True) + gc.sum(1).unsqueeze(0) - inter
        pos = inter / union.clamp_min(1.0)                                                  # [B, world B]
    log_prob = F.log_softmax(_pair_logits(unit, glob, directed, temperature), dim=-1)
    return -((log_prob * pos).sum(-1) / pos.sum(1).clamp_min(1.0)).mean(-1)


def vmf_compactness(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The paper's compactness (minimality) term L_Comp[a->b] = -E_i <mu_i^a, muhat_{y_i}^b>.

    With von Mises-Fisher class-conditionals on the unit sphere, I(Z; X | Y) = E KL(p(z|x) || p(z|y))
    reduces to pulling each sample's unit embedding mu_i^a towards the mean direction of its class
    computed from the *other* modality: muhat_y^b = normalise(mean of unit b-embeddings with label y over
    the global batch, all ranks). Gradients flow through both sides; mean over this rank's anchors.
    """
    unit, glob = unit_and_global({"a": a, "b": b})
    return vmf_compactness_pairs(unit, glob, [("a", "b")], labels, global_labels(labels))[0]


def vmf_compactness_pairs(unit: dict, glob: dict, directed: list[tuple], labels: torch.Tensor,
                          glabels: torch.Tensor) -> torch.Tensor:
    """`vmf_compactness` of each directed pair (a, b) of `unit_and_global`'s keys, with `glabels` the global
    batch's class ids (`global_labels`), as a [len(directed)] tensor. Each target modality's class mean
    directions are computed once, however many pairs point at it."""
    targets = list(dict.fromkeys(b for _, b in directed))
    g = torch.stack([glob[b] for b in targets])                                            # [Q, world B, d]
    # Each anchor's class sum over the global batch as one matmul with a same-label mask (its own row is
    # in the global batch, so the class is never empty); no `torch.unique`, whose data-dependent size is a
    # host sync.
    same = (labels.long().unsqueeze(1) == glabels.long().unsqueeze(0)).to(g.dtype)         # [B, world B]
    own = F.normalize(same @ g, dim=-1)          # [Q, B, d]: each anchor's class mean direction per target
    anchors = torch.stack([unit[a] for a, _ in directed])                                   # [P, B, d]
    if anchors.shape[1] == 0:
        return anchors.sum((1, 2)) * 0
    return -(anchors * own[[targets.index(b) for _, b in directed]]).sum(-1).mean(-1)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-9).log()).sum(-1)


def compactness(scores: torch.Tensor, form: str = "entropy") -> torch.Tensor:
    """Routing compactness of [B, N] per-sample routing mass.

    'entropy': mean entropy of each sample's routing mass (low when mass sits on few experts). It is
    also minimised by sending every sample to the same expert.
    'mutual_info': that minus the entropy of the global-batch mean routing, i.e. -I(sample; expert):
    each sample concentrates on few experts *and* different samples use different experts.
    """
    scores = scores.float()
    p = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)
    per_sample = _entropy(p).mean()
    if form == "entropy":
        return per_sample
    marginal = gather_with_grad(p).mean(0)
    return per_sample - _entropy(marginal)


def pairs(modalities: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for i, a in enumerate(modalities) for b in modalities[i + 1:]]
