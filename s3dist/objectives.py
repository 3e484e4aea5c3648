"""The objectives of S3's two training stages, built from the primitives in `s3dist.losses`.

Stage 1, Specialization (self-supervised; encoders and routers train):
    L = intra_weight * L_rep + cross_weight * L_dsc + aux_loss_weight * L_aux (+ z_loss_weight * L_z)
    (the L_aux term only with moe.balance=aux_loss; 'bias' balances by the router's selection bias instead)
    L_rep: InfoNCE between two augmented views of each modality; L_dsc: cross-modal InfoNCE.
Stage 2, Selection (supervised; only the routers train):
    L = supcon_weight * L_SupCon + compact_weight * L_Comp (+ select_balance_weight * L_aux)
    L_SupCon: cross-modal supervised contrastive loss, both directions (sufficiency);
    L_Comp: the vMF compactness on the representation, both directions (minimality). The paper's Stage 2
    has no balance term (experts should now be used unevenly): `select_balance_weight` defaults to 0.

Each function takes the engine (or the bare encoder), a batch, the run config and the modalities, and
returns (loss, {term name: value}) for logging.
"""

from __future__ import annotations

import torch

from s3dist import losses
from s3dist.config import RunConfig


def augment(x: torch.Tensor, mask: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A view of each sample for Stage 1: time masking (keeps at least one real step), feature dropout,
    Gaussian noise; every row of x [B, T, d] draws its own."""
    if cfg.time_mask > 0 and x.shape[1] > 1:
        drop = (torch.rand(mask.shape, device=x.device) < cfg.time_mask) & mask
        keep = mask & ~drop
        empty = ~keep.any(1) & mask.any(1)
        # never mask a sample away entirely (torch.where, not keep[empty] = ...: boolean indexing waits for
        # the device to learn how many rows it selects)
        mask = torch.where(empty.unsqueeze(1), mask, keep)
    if cfg.feature_dropout > 0:
        x = torch.where(torch.rand_like(x) >= cfg.feature_dropout, x / (1 - cfg.feature_dropout), 0.0)
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn_like(x)
    return torch.where(mask.unsqueeze(-1), x, 0.0), mask


def specialize_loss(engine, batch, cfg: RunConfig, modalities: list[str]):
    """Stage 1: intra-modal InfoNCE (two views) + cross-modal InfoNCE + balance (+ z) losses."""
    st = cfg.stages
    feats, masks = {}, {}
    for m in modalities:
        # both views in one augment call (rows [0, B) view 1, [B, 2B) view 2, each row its own draws) and
        # one encoder call
        feats[m], masks[m] = augment(batch.features[m].repeat(2, 1, 1), batch.masks[m].repeat(2, 1), st)
    out = engine(feats, masks)
    b = len(batch)
    e1 = {m: e[:b] for m, e in out.embeddings.items()}
    e2 = {m: e[b:] for m, e in out.embeddings.items()}
    # every embedding normalised and gathered once, in one collective, for all the terms below
    unit, glob = losses.unit_and_global({**{(m, 1): e1[m] for m in modalities}, **{(m, 2): e2[m] for m in modalities}})

    intra = [((m, 1), (m, 2)) for m in modalities]
    cross = [((a, 1), (b_, 1)) for a, b_ in losses.pairs(modalities)]
    nce = losses.info_nce_pairs(unit, glob, intra + cross, st.temperature)  # all terms in one batched call
    terms = {"intra": nce[:len(intra)].mean()}
    if cross:
        terms["cross"] = nce[len(intra):].mean()
    total = st.intra_weight * terms["intra"] + st.cross_weight * terms.get("cross", 0.0)
    # balance=bias / none: the loss is still computed and logged (it measures the load), never applied
    aux_weight = cfg.moe.aux_loss_weight if cfg.moe.balance == "aux_loss" else 0.0
    return _router_terms(total, terms, out, aux_weight, cfg.moe.z_loss_weight)


def select_loss(engine, batch, cfg: RunConfig, modalities: list[str]):
    """Stage 2: cross-modal SupCon with the task labels + compactness (routers only train)."""
    st = cfg.stages
    out = engine(batch.features, batch.masks)
    emb = out.embeddings
    y = batch.concepts if st.select_target == "concepts" else batch.labels  # train.py checked they exist
    prs = losses.pairs(modalities)
    directed = [d for a, b in prs for d in ((a, b), (b, a))] or [(modalities[0], modalities[0])]
    # every embedding normalised and gathered once, and the labels once, for all the terms below
    unit, glob = losses.unit_and_global(emb)
    gy = losses.global_labels(y)
    terms = {"supcon": losses.sup_con_pairs(unit, glob, directed, y, gy, st.temperature).mean()}
    if st.compact_weight > 0:
        terms["compact"] = compactness_term(out, (unit, glob), (y, gy), directed, st.compactness)
    total = st.supcon_weight * terms["supcon"] + st.compact_weight * terms.get("compact", 0.0)
    return _router_terms(total, terms, out, st.select_balance_weight, cfg.moe.z_loss_weight)


def compactness_term(out, embeddings: tuple[dict, dict], labels: tuple[torch.Tensor, torch.Tensor],
                     directed: list[tuple[str, str]], form: str) -> torch.Tensor:
    """'vmf' on the representation (the paper), or the earlier routing-mass forms (ablations).
    `embeddings` = (unit, global) and `labels` = (local, global) as `select_loss` prepares them."""
    if form == "vmf":
        (unit, glob), (y, gy) = embeddings, labels
        return losses.vmf_compactness_pairs(unit, glob, directed, y, gy).mean()
    scores = out.sample_scores
    return sum(losses.compactness(s, form) for s in scores.values()) / max(1, len(scores))


def _router_terms(total, terms, out, aux_weight: float, z_weight: float):
    if out.aux_loss is not None:
        terms["aux"] = out.aux_loss  # logged also at weight 0: the load it measures is worth watching
        if aux_weight > 0:
            total = total + aux_weight * out.aux_loss
    if out.z_loss is not None and z_weight > 0:
        terms["z"] = out.z_loss
        total = total + z_weight * out.z_loss
    terms["loss"] = total
    return total, terms


STAGE_LOSS = {"specialize": specialize_loss, "select": select_loss}
