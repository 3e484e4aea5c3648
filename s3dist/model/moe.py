"""Expert-parallel MoE layers built on `deepspeed.moe.layer.MoE`.

`ExpertParallelMoE` owns one DeepSpeed MoE per *routing group*: for the S3 router all modalities
form one group (one fused expert pool, one all-to-all pair per layer); for the plain top-k baseline
each modality is its own group with DeepSpeed's own `TopKGate`. The module takes and returns
per-modality token tensors, so the encoder never sees how tokens were packed.

Each DeepSpeed MoE runs its local experts through `GroupedExperts` (`s3dist.model.experts`): batched
GEMMs where `moe.expert_compute` says so, DeepSpeed's per-expert loop otherwise, same parameters.

This module knows the expert-parallel *size and rank* (to build only this rank's experts and to
seed them by global index) but creates no process group: `s3dist.dist` attaches groups.
"""

from __future__ import annotations

import torch
from torch import nn

from s3dist.config import MoEConfig
from s3dist.importing import MLFLOW, unimportable

with unimportable(MLFLOW):  # DeepSpeed imports it for its autotuner (s3dist.importing)
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import TopKGate

from s3dist.model.experts import ExpertMLP, GroupedExperts, install_grouped_experts
from s3dist.model.router import EvalDropCounter, PruneSpec, RoutingPlan, S3Router, Segment, count_routes


def init_expert_(experts: GroupedExperts, i: int, seed: int) -> None:
    """Initialise local expert `i` from its own generator (nn.Linear's default distribution).

    DeepSpeed deep-copies a single prototype, so all experts would start identical; seeding by the
    expert's *global* index makes the weights independent of ep_size and of which rank builds them.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w, b in ((experts.w1[i], experts.b1[i]), (experts.w2[i], experts.b2[i])):
            bound = w.shape[1] ** -0.5  # fan-in
            w.copy_(torch.empty_like(w).uniform_(-bound, bound, generator=gen))
            b.copy_(torch.empty_like(b).uniform_(-bound, bound, generator=gen))


class DeepSpeedTopKGate(EvalDropCounter, TopKGate):
    """DeepSpeed's own TopKGate for the plain-MoE baseline, with three small adaptations.

    * the expert-parallel group may be attached more than once (eval and the engine both attach);
    * in eval it never drops tokens: DeepSpeed's dropping capacity is computed from the local token
      count, and uneven evaluation batches across ranks would give unequal all-to-all buffers;
    * it keeps the same on-device load counters as S3Router for the metrics.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_experts = self.wg.out_features
        self.register_buffer("_counters", torch.zeros(2 * self.num_experts + 2), persistent=False)
        self.register_buffer("_eval_counters", torch.zeros(2), persistent=False)
        self.sample_scores: dict[str, torch.Tensor] = {}
        self.z_loss = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, input, used_token=None, sparse_routes=False, use_tutel=False):
        drop = self.drop_tokens
        self.drop_tokens = drop and self.training
        try:
            out = super().forward(input, used_token, sparse_routes, use_tutel)
        finally:
            self.drop_tokens = drop
        if sparse_routes:
            with torch.no_grad():
                indices, demand = out[3], out[6].float()
                # no boolean indexing: on a GPU its data-dependent size is a host sync per layer
                kept = count_routes(indices.clamp_min(0), indices >= 0, self.num_experts)
                if self.training:
                    self._counters += torch.cat([demand, kept, demand.new_zeros(1),
                                                 demand.new_tensor([float(input.shape[0])])])
                else:
                    self._count_eval(demand.sum(), kept.sum())
        return out

    def pop_load_counters(self) -> torch.Tensor:
        out = self._counters.clone()
        self._counters.zero_()
        return out


class ExpertParallelMoE(nn.Module):
    """One MoE layer for all modalities, experts sharded over `ep_size` ranks by DeepSpeed."""

    def __init__(self, d_model: int, modalities: list[str], cfg: MoEConfig, *, ep_size: int, ep_rank: int,
                 layer_index: int) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.kind = cfg.kind
        self.n = cfg.resolved_num_experts()
        self.k = cfg.resolved_top_k()
        if cfg.kind == "s3":
            self.groups = [self.modalities]
            group_experts = cfg.total_experts(len(self.modalities))
        elif cfg.kind == "topk":
            self.groups = [[m] for m in self.modalities]
            group_experts = self.n
        else:
            raise ValueError(f"ExpertParallelMoE does not build moe.kind={cfg.kind!r}")
        self.moes = nn.ModuleList()
        for g, group in enumerate(self.groups):
            moe = MoE(hidden_size=d_model, expert=ExpertMLP(d_model, cfg.expert_hidden), num_experts=group_experts,
                      ep_size=ep_size, k=self.k, capacity_factor=cfg.capacity_factor,
                      eval_capacity_factor=cfg.eval_capacity_factor, min_capacity=cfg.min_capacity,
                      noisy_gate_policy="Jitter" if cfg.noisy_gate == "jitter" else None,
                      drop_tokens=cfg.drop_tokens, use_rts=False)
            if cfg.kind == "s3":
                gate = S3Router(d_model, group, self.n, self.k, shared_experts=cfg.shared_experts,
                                capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                                min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens,
                                noisy_gate=cfg.noisy_gate, compute_z_loss=cfg.z_loss_weight > 0,
                                balance=cfg.balance, bias_update_rate=cfg.bias_update_rate)
            else:
                gate = DeepSpeedTopKGate(d_model, group_experts, self.k, cfg.capacity_factor,
                                         cfg.eval_capacity_factor, cfg.min_capacity,
                                         "Jitter" if cfg.noisy_gate == "jitter" else None, cfg.drop_tokens, False)
            moe.deepspeed_moe.gate = gate
            experts = install_grouped_experts(moe, cfg.expert_compute)
            for i in range(experts.num_local_experts):
                global_index = ep_rank * experts.num_local_experts + i
                init_expert_(experts, i, cfg.init_seed * 1_000_003 + layer_index * 10_007 + g * 1_009 + global_index)
            self.moes.append(moe)

    @property
    def routers(self) -> list[nn.Module]:
        return [moe.deepspeed_moe.gate for moe in self.moes]

    def forward(self, tokens: dict[str, torch.Tensor], valid: dict[str, torch.Tensor],
                prune: PruneSpec | None = None):
        """tokens[m]: [B, T, d]; valid[m]: bool [B, T]; `prune`: Stage 3's rule for this layer.
        Returns (outputs {m: [B, T, d]}, l_aux, z_loss)."""
        outputs: dict[str, torch.Tensor] = {}
        l_aux = z_loss = None
        for group, moe in zip(self.groups, self.moes):
            segs, flat, used = _pack(group, tokens, valid)
            d = flat.shape[-1]
            gate = moe.deepspeed_moe.gate
            if isinstance(gate, S3Router):
                gate.plan = RoutingPlan(segs, prune)
            elif prune:
                raise ValueError("Stage 3 pruning needs the S3 router (moe.kind='s3')")
            try:
                out, aux, _ = moe(flat, used.to(flat.dtype))
            finally:
                if isinstance(gate, S3Router):
                    gate.plan = None
            # split, not slicing: one concatenation in backward instead of a zero-filled full-size
            # gradient per modality
            for s, part in zip(segs, out.split([s.tokens for s in segs])):
                outputs[s.modality] = part.view(s.batch, s.steps, d)
            l_aux = aux if l_aux is None else l_aux + aux
            if gate.z_loss is not None:
                z_loss = gate.z_loss if z_loss is None else z_loss + gate.z_loss
        return outputs, l_aux, z_loss

    @torch.no_grad()
    def prune_scores(self, tokens: dict[str, torch.Tensor], valid: dict[str, torch.Tensor], unit: str
                     ) -> dict[str, torch.Tensor]:
        """The scores Stage 3 ranks, per modality, as one flat tensor (`S3Router.unit_scores`: computed as
        the router's forward computes them, without dispatching)."""
        out = {}
        for group, router in zip(self.groups, self.routers):
            if not isinstance(router, S3Router):
                raise ValueError("Stage 3 pruning needs the S3 router (moe.kind='s3')")
            out.update(router.unit_scores(*_pack(group, tokens, valid), unit))
        return out

    def sample_scores(self) -> dict[str, torch.Tensor]:
        """Per (sample, expert) mean gate probability of the last forward, per modality."""
        out = {}
        for gate in self.routers:
            out.update(getattr(gate, "sample_scores", {}))
        return out


def _pack(group: list[str], tokens: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]
          ) -> tuple[list[Segment], torch.Tensor, torch.Tensor]:
    """A routing group's tokens as the layer's token matrix: (segments, tokens [S, d], valid bool [S]),
    modality by modality in the group's order."""
    segs = [Segment(m, tokens[m].shape[0], tokens[m].shape[1]) for m in group]
    d = tokens[group[0]].shape[-1]
    return (segs, torch.cat([tokens[m].reshape(-1, d) for m in group]),
            torch.cat([valid[m].reshape(-1) for m in group]))
