"""The contrastive losses on one process (their multi-rank gathering is exercised by the 2-rank
training tests): supervised contrastive with task labels and with multi-hot concepts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from s3dist import losses


def test_sup_con_with_one_hot_concepts_equals_the_label_form():
    """Multi-hot targets that are one-hot encode a plain label: the loss is the same."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 2, 1, 0, 2, 2])
    assert torch.allclose(losses.sup_con(a, b, labels, 0.2), losses.sup_con(a, b, F.one_hot(labels, 3), 0.2))


def test_sup_con_with_concepts_weights_positives_by_jaccard_overlap():
    """Each candidate counts as a positive in proportion to |c_i & c_j| / |c_i | c_j|, written out row by
    row here; an anchor with no active concept contributes zero."""
    torch.manual_seed(1)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    c = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    t = 0.5
    logp = F.log_softmax(F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / t, dim=-1)
    per_anchor = []
    for i in range(4):
        w = []
        for j in range(4):
            inter = int((c[i] & c[j]).sum())
            union = int((c[i] | c[j]).sum())
            w.append(inter / union if union else 0.0)
        total = sum(w)
        per_anchor.append(-sum(wj * float(logp[i, j]) for j, wj in enumerate(w)) / max(total, 1.0))
    got = float(losses.sup_con(a, b, c, t))
    assert math.isclose(got, sum(per_anchor) / 4, rel_tol=1e-5)
    assert per_anchor[3] == 0.0


def test_info_nce_pairs_equals_each_pair_written_out():
    """All pairs and both directions in one batched call equal, pair by pair, the symmetric InfoNCE written
    out with two matmuls: values and the embeddings' gradients (one process: the global batch is the local one)."""
    torch.manual_seed(2)
    emb = {k: torch.randn(5, 4, requires_grad=True) for k in ("a", "b", "c")}
    pairs = [("a", "b"), ("c", "c"), ("b", "c")]
    t = 0.3
    unit, glob = losses.unit_and_global(emb)
    got = losses.info_nce_pairs(unit, glob, pairs, t)
    got.sum().backward()
    grads = {k: e.grad.clone() for k, e in emb.items()}

    ref = []
    for x, y in pairs:
        ux, uy = F.normalize(emb[x], dim=-1), F.normalize(emb[y], dim=-1)
        target = torch.arange(5)
        ref.append(0.5 * (F.cross_entropy(ux @ uy.t() / t, target) + F.cross_entropy(uy @ ux.t() / t, target)))
    ref = torch.stack(ref)
    for e in emb.values():
        e.grad = None
    ref.sum().backward()
    torch.testing.assert_close(got, ref)
    for k, e in emb.items():
        torch.testing.assert_close(grads[k], e.grad, msg=lambda s: f"{k}: {s}")
    # a pair of identical embeddings is the easiest case: lower loss than the random pairs
    assert got[1] < got[0] and got[1] < got[2]


def test_contrastive_embeddings_of_different_shapes_are_refused_by_name():
    import pytest

    with pytest.raises(ValueError, match=r"one shape.*'b': \(3, 5\)"):
        losses.unit_and_global({"a": torch.randn(3, 4), "b": torch.randn(3, 5)})
