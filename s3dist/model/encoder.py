"""The multimodal encoder: per modality an input stage, residual blocks whose FFN is the MoE, pooling.

`model.arch='transformer'` (default, the paper's form): per modality an input projection plus
sinusoidal positions, then `num_layers` pre-norm blocks

    h = h + Attention_m(LN(h))            (masked self-attention, per modality)
    h = h + MoE(LN(h))                    (one MoE layer for all modalities: one all-to-all pair)

and the representation is the masked mean of the final normed residual stream. Because the MoE
sits inside a residual, a pruned routing path removes only its own contribution and the token keeps
flowing (Stage 3). `model.arch='stem'` keeps the earlier conv / GRU stem without attention, and
`model.representation='expert_output'` the earlier pooled bare expert output, for ablations.

The per-modality modules of a block (norms, attention projections) hold their parameters stacked over
the modalities (`s3dist.model.stacked`) and the residual stream is one [M, B, T, d] stack (a shorter
modality padded at the end, masked), so each runs once for all modalities instead of once per modality,
and DeepSpeed's optimizer handles one tensor per kind instead of one per modality. The state dict keeps
the per-modality names (`blocks.0.attn.vision.qkv.weight`). The input projections stay per modality
(their input widths differ).

`S3Encoder` is plain PyTorch plus `ExpertParallelMoE`; it holds no process group. Stage 3 needs
collectives (a global threshold), so the encoder takes a *sparsifier* (`s3dist.sparsify`) that it
asks for each MoE layer's pruning rule, instead of calling collectives itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from s3dist.config import ModelConfig, MoEConfig
from s3dist.model.moe import ExpertParallelMoE
from s3dist.model.router import PruneSpec
from s3dist.model.stacked import MODALITY_HINT, ModalityLayerNorm, ModalityLinear, register_per_copy_state


class ModalityStem(nn.Module):
    """'stem' arch: input projection + small temporal encoder for one modality: [B, T, D_in] -> [B, T, d]."""

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


class InputProjection(nn.Module):
    """'transformer' arch: linear projection plus sinusoidal positions counted from the first *real* step,
    so front padding (MultiBench pads at the front) does not shift what a position means."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        self.d_model = d_model
        self._table = torch.empty(0)  # the encoding of positions 0..len-1, built on first use (not state)

    def positions(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[length, d_model] sinusoidal encodings, computed once and reused: every step looks its position up
        instead of recomputing the same sines (a dozen small ops per call, each a kernel launch on a GPU).
        Rebuilt for a longer sequence or another dtype / device."""
        t = self._table
        if t.shape[0] < length or t.dtype != dtype or t.device != device:
            half = (self.d_model + 1) // 2
            freq = torch.exp(torch.arange(half, device=device, dtype=dtype) * (-math.log(10000.0) / max(half, 1)))
            angle = torch.arange(max(length, t.shape[0]), device=device, dtype=dtype).unsqueeze(-1) * freq
            self._table = t = torch.cat([angle.sin(), angle.cos()], dim=-1)[:, : self.d_model]
        return t

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)                                # [B, T]
        pe = F.embedding(pos, self.positions(x.shape[1], x.dtype, x.device))          # [B, T, d]
        # where, not a product with the mask: a NaN in a padded step's features stays out
        return torch.where(mask.unsqueeze(-1), self.proj(x) + pe, 0.0)


class SelfAttention(nn.Module):
    """Multi-head self-attention of each modality over its own real steps, every modality in one batched
    call (`scaled_dot_product_attention` over modality x sample). x: [M, B, T, d].

    The projections are per modality, stacked (`ModalityLinear`); the state dict keeps the per-modality
    names (`vision.qkv.weight`, ...)."""

    def __init__(self, modalities: list[str], d_model: int, num_heads: int) -> None:
        super().__init__()
        self.heads = num_heads
        self.modalities = list(modalities)
        # qkv then out per modality, the order per-modality modules drew them in: a seed gives the same
        # initial weights as before the stacking
        per_modality = [(nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)) for _ in modalities]
        self.qkv = ModalityLinear.from_linears([qkv for qkv, _ in per_modality])
        self.out = ModalityLinear.from_linears([out for _, out in per_modality])
        register_per_copy_state(self, _attention_names, MODALITY_HINT)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """keys: bool [M, B, T], the steps a sample's queries attend to (`attention_keys`)."""
        m, b, t, d = x.shape
        q, k, v = self.qkv(x).view(m * b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys.view(m * b, 1, 1, t))
        return self.out(y.transpose(1, 2).reshape(m, b, t, d))


def attention_keys(valid: torch.Tensor) -> torch.Tensor:
    """The attention mask of every block: each sample's real steps. A sample with no real step (possible only
    in empty / padded rows) would attend to nothing and give NaN; it attends everywhere instead: its steps
    are never pooled nor routed."""
    return valid | ~valid.any(-1, keepdim=True)


def _attention_names(attn: SelfAttention) -> dict[str, list[str]]:
    return {f"{proj}.{p}": [f"{m}.{proj}.{p}" for m in attn.modalities] for proj in ("qkv", "out")
            for p in ("weight", "bias")}


class DenseFFN(nn.Module):
    """Dense baseline FFN: per-modality MLP with the active parameters of k experts."""

    def __init__(self, d_model: int, modalities: list[str], cfg: MoEConfig) -> None:
        super().__init__()
        hidden = cfg.expert_hidden * cfg.resolved_top_k()
        self.mlps = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
                                   for m in modalities})

    def forward(self, tokens, valid, prune=None):
        if prune:
            raise ValueError("Stage 3 pruning needs MoE layers with the S3 router (moe.kind='s3')")
        return {m: self.mlps[m](x) for m, x in tokens.items()}, None, None


class Block(nn.Module):
    """One pre-norm residual block for all modalities: attention (optional) per modality, computed for all
    modalities together, and one shared FFN call (the MoE: every modality's tokens in one dispatch). The
    residual stream is a modality stack [M, B, T, d]."""

    def __init__(self, d_model: int, modalities: list[str], model_cfg: ModelConfig, ffn: nn.Module) -> None:
        super().__init__()
        self.attention = model_cfg.arch == "transformer"
        if self.attention:
            self.attn_norm = ModalityLayerNorm(modalities, d_model)
            self.attn = SelfAttention(modalities, d_model, model_cfg.num_heads)
        self.ffn_norm = ModalityLayerNorm(modalities, d_model)
        self.ffn = ffn

    def attend(self, h: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if not self.attention:
            return h
        return h + self.attn(self.attn_norm(h), keys)

    def ffn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(h)


class Sparsifier(Protocol):
    """What the encoder asks, before each MoE layer, when Stage 3 is on (`s3dist.sparsify`)."""

    def prune_spec(self, layer: int, moe: ExpertParallelMoE, x: dict[str, torch.Tensor],
                   valid: dict[str, torch.Tensor]) -> PruneSpec | None: ...


@dataclass
class EncoderOutput:
    embeddings: dict[str, torch.Tensor]           # modality -> [B, d] pooled representation
    aux_loss: torch.Tensor | None                  # load-balancing loss summed over layers
    z_loss: torch.Tensor | None                    # router z-loss summed over layers
    sample_scores: dict[str, torch.Tensor]         # modality -> [B, N] last layer's mean gate probabilities


class S3Encoder(nn.Module):
    def __init__(self, modality_dims: dict[str, int], model_cfg: ModelConfig, moe_cfg: MoEConfig, *,
                 ep_size: int = 1, ep_rank: int = 0) -> None:
        super().__init__()
        self.modalities = list(modality_dims)
        self.pooled_tokens = model_cfg.tokens == "pooled"
        self.representation = model_cfg.representation
        d = model_cfg.d_model
        if model_cfg.arch == "transformer":
            self.inputs = nn.ModuleDict({m: InputProjection(dim, d) for m, dim in modality_dims.items()})
        else:
            self.inputs = nn.ModuleDict({m: ModalityStem(dim, model_cfg) for m, dim in modality_dims.items()})

        def ffn(i: int) -> nn.Module:
            if moe_cfg.kind == "dense":
                return DenseFFN(d, self.modalities, moe_cfg)
            return ExpertParallelMoE(d, self.modalities, moe_cfg, ep_size=ep_size, ep_rank=ep_rank, layer_index=i)

        self.blocks = nn.ModuleList([Block(d, self.modalities, model_cfg, ffn(i)) for i in range(model_cfg.num_layers)])
        self.final_norm = ModalityLayerNorm(self.modalities, d)

    @property
    def layers(self) -> list[nn.Module]:
        """The FFN (MoE or dense) of every block, in order."""
        return [b.ffn for b in self.blocks]

    def moe_layers(self) -> list[ExpertParallelMoE]:
        return [f for f in self.layers if isinstance(f, ExpertParallelMoE)]

    def routers(self) -> list[nn.Module]:
        return [r for layer in self.moe_layers() for r in layer.routers]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers() for p in r.parameters()]

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                sparsifier: Sparsifier | None = None) -> EncoderOutput:
        """features[m]: [B, T, D_m]; masks[m]: bool [B, T]. Every modality must be present, also with B=0
        (each MoE layer is a collective over the expert-parallel group)."""
        h, valid, out, out_valid, aux, z = self._run(features, masks, sparsifier)
        if self.representation == "residual":
            emb = dict(zip(self.modalities, _masked_mean(self.final_norm(h), valid).unbind(0)))
        else:
            emb = {m: _masked_mean(out[m], out_valid[m]) for m in self.modalities}
        last = self.layers[-1]
        scores = last.sample_scores() if isinstance(last, ExpertParallelMoE) else {}
        return EncoderOutput(emb, aux, z, scores)

    def ffn_input(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], layer: int,
                  sparsifier: Sparsifier | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The tokens entering block `layer`'s FFN (its MoE layer) and their validity, with the blocks before
        it run (pruned by `sparsifier`) and nothing after it: Stage 3's calibration reads a layer's routing
        scores from these. Every rank must ask for the same layer (the layers before it are collectives)."""
        return self._run(features, masks, sparsifier, stop_at=layer)

    def _run(self, features, masks, sparsifier: Sparsifier | None, stop_at: int | None = None):
        """The blocks in order: (h, valid as modality stacks, last FFN output and its validity per modality,
        aux, z), or block `stop_at`'s FFN input and validity per modality."""
        # Under DeepSpeed bf16 the parameters are bf16 but nothing casts the inputs (it does so only for
        # fp16 auto_cast): the data stream's float32 features are cast here, once, for every caller.
        dtype = self.final_norm.weight.dtype
        xs, vs = [], []
        for m in self.modalities:
            x = self.inputs[m](features[m].to(dtype), masks[m])
            v = masks[m]
            if self.pooled_tokens:
                x = _masked_mean(x, v).unsqueeze(1)
                v = v.any(dim=1, keepdim=True)
            xs.append(x)
            vs.append(v)
        steps = [x.shape[1] for x in xs]
        h, valid = _stack(xs), _stack(vs)
        # the MoE takes each modality's own steps (a shorter modality's padding is not routed)
        x_valid = self._per_modality(valid, steps)
        keys = attention_keys(valid)  # the same in every block
        aux = z = None
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            h = block.attend(h, keys)
            x = self._per_modality(block.ffn_input(h), steps)
            if i == stop_at:
                return x, x_valid
            prune = None
            if sparsifier is not None and isinstance(block.ffn, ExpertParallelMoE):
                prune = sparsifier.prune_spec(i, block.ffn, x, x_valid)
            out, a, zl = block.ffn(x, x_valid, prune)
            aux, z = _add(aux, a), _add(z, zl)
            h = h + _stack([out[m] for m in self.modalities])
        if stop_at is not None:
            raise IndexError(f"the encoder has {len(self.blocks)} blocks, no block {stop_at}")
        return h, valid, out, x_valid, aux, z

    def _per_modality(self, stacked: torch.Tensor, steps: list[int]) -> dict[str, torch.Tensor]:
        """A modality stack [M, B, T, ...] as {modality: [B, T_m, ...]} views."""
        return {m: part if t == part.shape[1] else part[:, :t] for m, t, part in zip(self.modalities, steps, stacked)}


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-modality [B, T_m, ...] tensors as one [M, B, max T_m, ...] stack, shorter ones padded at the end
    (zeros; False in masks, so padded steps are neither attended to, routed nor pooled)."""
    t = max(p.shape[1] for p in parts)
    if any(p.shape[1] != t for p in parts):
        parts = [F.pad(p, (0, 0) * (p.ndim - 2) + (0, t - p.shape[1])) for p in parts]
    return torch.stack(parts)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the steps (dim -2) of x [..., T, d] where mask [..., T] is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)
