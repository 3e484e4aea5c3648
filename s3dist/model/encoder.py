"""The multimodal encoder: per-modality stems, MoE layers into one shared latent space, pooling.

`S3Encoder` is plain PyTorch plus `ExpertParallelMoE`; it holds no process group. Stage 3's
global keep-mask needs a collective, so the encoder takes the keep-mask *builder* as an argument
(`s3dist.sparsify.global_keep_masks` in training and evaluation) instead of calling it itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from s3dist.config import ModelConfig, MoEConfig
from s3dist.model.moe import ExpertParallelMoE


class ModalityStem(nn.Module):
    """Input projection + small temporal encoder for one modality: [B, T, D_in] -> [B, T, d]."""

    def __init__(self, in_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.proj = nn.Linear(in_dim, d)
        self.temporal_kind = cfg.temporal
        if cfg.temporal == "conv":
            # Depthwise conv mixes neighbouring steps; left padding keeps it causal so front padding
            # (MultiBench pads at the front) never leaks into real steps.
            self.kernel = cfg.temporal_kernel
            self.conv = nn.Conv1d(d, d, cfg.temporal_kernel, groups=d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        elif cfg.temporal == "gru":
            self.gru = nn.GRU(d, d, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        h = self.proj(x) * m
        if self.temporal_kind == "conv":
            c = self.conv(F.pad(h.transpose(1, 2), (self.kernel - 1, 0))).transpose(1, 2)
            h = h + c
            h = h + self.mlp(h)
        elif self.temporal_kind == "gru":
            h = h + self.gru(h)[0]
        return self.norm(h) * m


class DenseBlock(nn.Module):
    """Dense baseline layer: per-modality MLP with the active parameters of k experts."""

    def __init__(self, d_model: int, modalities: list[str], cfg: MoEConfig) -> None:
        super().__init__()
        hidden = cfg.expert_hidden * cfg.resolved_top_k()
        self.mlps = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
                                   for m in modalities})

    def forward(self, tokens, valid, keep_masks=None):
        if keep_masks:
            raise ValueError("keep-masks (Stage 3) need moe.kind='s3'")
        return {m: self.mlps[m](x) for m, x in tokens.items()}, None, None


@dataclass
class Prelude:
    x: dict[str, torch.Tensor]        # normed input of the last MoE layer, [B, T, d] per modality
    valid: dict[str, torch.Tensor]    # bool [B, T]
    aux: torch.Tensor | None
    z: torch.Tensor | None


@dataclass
class EncoderOutput:
    embeddings: dict[str, torch.Tensor]           # modality -> [B, d] pooled last-layer expert output
    aux_loss: torch.Tensor | None                  # load-balancing loss summed over layers
    z_loss: torch.Tensor | None                    # router z-loss summed over layers
    sample_scores: dict[str, torch.Tensor]         # modality -> [B, N] last layer routing scores
    keep_masks: dict[str, torch.Tensor] | None     # Stage 3 masks used, if any


KeepMaskBuilder = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class S3Encoder(nn.Module):
    def __init__(self, modality_dims: dict[str, int], model_cfg: ModelConfig, moe_cfg: MoEConfig, *,
                 ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.modalities = list(modality_dims)
        self.pooled_tokens = model_cfg.tokens == "pooled"
        d = model_cfg.d_model
        self.stems = nn.ModuleDict({m: ModalityStem(dim, model_cfg) for m, dim in modality_dims.items()})
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(model_cfg.num_moe_layers)])
        if moe_cfg.kind == "dense":
            self.layers = nn.ModuleList([DenseBlock(d, self.modalities, moe_cfg)
                                         for _ in range(model_cfg.num_moe_layers)])
        else:
            self.layers = nn.ModuleList([ExpertParallelMoE(d, self.modalities, moe_cfg, ep_size=ep_size,
                                                           ep_rank=ep_rank, layer_index=i)
                                         for i in range(model_cfg.num_moe_layers)])

    def routers(self) -> list[nn.Module]:
        return [r for layer in self.layers if isinstance(layer, ExpertParallelMoE) for r in layer.routers]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers() for p in r.parameters()]

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                keep_fraction: float = 1.0, keep_mask_builder: KeepMaskBuilder | None = None) -> EncoderOutput:
        """features[m]: [B, T, D_m]; masks[m]: bool [B, T]. Every modality must be present, also with B=0."""
        pre = self.prelude(features, masks)
        return self.last_layer(pre, keep_fraction, keep_mask_builder)

    def prelude(self, features, masks) -> "Prelude":
        """Stems and every MoE layer but the last; returns the normed input of the last layer."""
        h, valid = {}, {}
        # Under DeepSpeed bf16 the parameters are bf16 but nothing casts the inputs (it does so only for
        # fp16 auto_cast): the data stream's float32 features are cast here, once, for every caller.
        dtype = self.norms[0].weight.dtype
        for m in self.modalities:
            x = self.stems[m](features[m].to(dtype), masks[m])
            v = masks[m]
            if self.pooled_tokens:
                x = _masked_mean(x, v).unsqueeze(1)
                v = v.any(dim=1, keepdim=True)
            h[m], valid[m] = x, v
        aux = z = None
        for norm, layer in zip(self.norms[:-1], self.layers[:-1]):
            out, a, zl = layer({m: norm(t) for m, t in h.items()}, valid)
            aux, z = _add(aux, a), _add(z, zl)
            h = {m: h[m] + out[m] for m in h}
        return Prelude({m: self.norms[-1](t) for m, t in h.items()}, valid, aux, z)

    def last_layer(self, pre: "Prelude", keep_fraction: float = 1.0,
                   keep_mask_builder: KeepMaskBuilder | None = None) -> EncoderOutput:
        """The last MoE layer (optionally with a Stage-3 keep-mask) and pooling into embeddings."""
        keep_masks = None
        if keep_fraction < 1.0:
            if keep_mask_builder is None:
                raise ValueError("keep_fraction < 1 needs a keep_mask_builder (s3dist.sparsify)")
            keep_masks = keep_mask_builder(self.routing_scores(len(self.layers) - 1, pre.x, pre.valid), keep_fraction)
        out, a, zl = self.layers[-1](pre.x, pre.valid, keep_masks)
        last = self.layers[-1]
        scores = last.sample_scores() if isinstance(last, ExpertParallelMoE) else {}
        emb = {m: _masked_mean(out[m], pre.valid[m]) for m in self.modalities}
        return EncoderOutput(emb, _add(pre.aux, a), _add(pre.z, zl), scores, keep_masks)

    @torch.no_grad()
    def routing_scores(self, layer: int, x: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]):
        """(sample, expert) scores of layer `layer` without dispatching: mean gate prob over valid steps."""
        moe = self.layers[layer]
        scores = {}
        for router in moe.routers:
            for m in router.modalities:
                probs = router.logits(m, x[m].reshape(-1, x[m].shape[-1])).softmax(-1)
                probs = probs.view(*x[m].shape[:2], -1) * valid[m].unsqueeze(-1)
                scores[m] = probs.sum(1) / valid[m].sum(1, keepdim=True).clamp_min(1)
        return scores


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)
