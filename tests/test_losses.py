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
