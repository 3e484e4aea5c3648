"""The S3 router: a gate that DeepSpeed's `MOELayer` calls in place of its `TopKGate`.

DeepSpeed 0.19's `MOELayer.forward` calls `gate(tokens, used_token, True, use_tutel)` and expects
sparse routes back: `(l_aux, capacity, num_experts, indices[k,S], locations[k,S], gates[k,S],
exp_counts)`. Everything about *where* tokens go is decided here; dispatch, the all-to-all pair and
the combine stay DeepSpeed's. What this gate adds over `TopKGate`:

* one router per modality over one fused expert pool, so all modalities share a single all-to-all
  pair per layer (each modality owns a block of N experts, or all share N with `shared_experts`); the
  modalities' segments are routed together (one softmax and top-k over every token, per-segment sums by
  index_add over token maps cached per batch layout), and the per-modality projections are one stacked
  parameter, one batched GEMM when the segments have equal token counts;
* padded time steps (and tokens outside `used_token`) route nowhere and never count as load;
* Stage 3's pruning rule (`PruneSpec`): a routing unit whose score is below the layer's threshold is
  dropped before capacity and combine; by default the kept gates are not renormalised, so pruning
  only removes contributions (a token with nothing kept gets a zero expert output, never NaN);
* no token drops in evaluation: capacity is then sized to the largest demand (agreed over the
  expert-parallel group), so every method's representation is extracted without drops;
* a capacity that is identical on every expert-parallel rank whatever each rank's token count
  (the all-to-all buffer is [experts, capacity, d]; unequal capacities hang or crash it), so an
  uneven last batch or an empty batch on one rank is safe;
* a load-balancing loss computed on *global* routing fractions (all-reduced over the data-parallel
  world), so the loss and its gradients do not depend on how the batch is split across ranks;
* an optional router z-loss, per-sample routing scores for the compactness loss and Stage 3, and
  load counters accumulated on device and reduced only once per log interval;
* `moe.balance=bias`: DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437, 2.1.2). A per-expert
  bias is added to the routing probabilities for the top-k *selection* only (the gates stay the unbiased
  probabilities) and moved by `bias_update_rate * sign(mean load - load)` after every training forward,
  from the global load the balance statistics already all-reduce (no extra collective, the same bias on
  every rank). It is a persistent buffer, so DeepSpeed saves it with the model states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from s3dist.model.stacked import MODALITY_HINT, mark_stacked, register_per_copy_state


@dataclass
class Segment:
    """`batch * steps` consecutive tokens of one modality inside the layer's token matrix."""

    modality: str
    batch: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.batch * self.steps


@dataclass
class PruneSpec:
    """Stage 3 for one MoE layer: keep a routing unit iff its score >= the modality's threshold.

    unit 'token_pairs': the unit is a selected (token, expert) pair, its score the gate probability;
    'sample_pairs': a (sample, expert) pair, its score the sample's mean gate probability of that expert
    (all of the sample's tokens routed to a pruned expert lose that path). `thresholds` may be +inf
    (prune everything: the residual stream passes unchanged) or -inf (keep everything)."""

    unit: str
    thresholds: dict[str, float]
    renormalize: bool = False


class EvalDropCounter:
    """Routes taken and routes kept after capacity in evaluation, summed on device (no host sync per
    forward): evaluation reports the dropped fraction from them, which must be 0."""

    def _count_eval(self, routed: torch.Tensor, kept: torch.Tensor) -> None:
        self._eval_counters += torch.stack([routed.float(), kept.float()])

    def pop_eval_counters(self) -> torch.Tensor:
        out = self._eval_counters.clone()
        self._eval_counters.zero_()
        return out


@dataclass
class RoutingPlan:
    """What the router needs to know about the tokens of one forward call.

    DeepSpeed's `MOELayer` passes only (tokens, used_token) to the gate, so the layer sets the plan
    on the router right before calling DeepSpeed and clears it after.
    """

    segments: list[Segment]
    prune: PruneSpec | None = None


class S3Router(EvalDropCounter, nn.Module):
    """Softmax top-k router per modality with global load balancing, keep-masks and load counters."""

    def __init__(self, d_model: int, modalities: list[str], experts_per_modality: int, k: int, *,
                 shared_experts: bool, capacity_factor: float, eval_capacity_factor: float,
                 min_capacity: int, drop_tokens: bool, noisy_gate: str = "none",
                 compute_z_loss: bool = True, balance: str = "aux_loss", bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.n = experts_per_modality
        self.k = k
        self.shared = shared_experts
        self.num_experts = self.n if shared_experts else self.n * len(self.modalities)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.noisy_gate = noisy_gate
        self.compute_z_loss = compute_z_loss  # off when its weight is 0: it costs a backward path
        # One linear router per modality, the only parameters Stage 2 trains: stacked [M, N, d] so all
        # modalities' logits are one batched GEMM and ZeRO handles one tensor (`s3dist.model.stacked`); the
        # state dict keeps `proj.{modality}.weight`. Drawn as per-modality nn.Linears drew them.
        per_modality = [nn.Linear(d_model, self.n, bias=False) for _ in self.modalities]
        for lin in per_modality:
            nn.init.normal_(lin.weight, std=d_model ** -0.5)
        self.proj = nn.Parameter(torch.stack([lin.weight.detach() for lin in per_modality]))
        mark_stacked(self.proj)
        register_per_copy_state(self, lambda r: {"proj": [f"proj.{m}.weight" for m in r.modalities]}, MODALITY_HINT)
        self.ep_group: dist.ProcessGroup | None = None
        self.plan: RoutingPlan | None = None
        # Filled on every forward for the model's losses and Stage 3 (not part of the state dict).
        self.sample_scores: dict[str, torch.Tensor] = {}
        self.z_loss: torch.Tensor | None = None
        # Load counters on device, summed over forwards since the last `pop_load_counters`:
        # [routes demanded per expert (before capacity) | routes kept per expert |
        #  router-entropy sum per modality | valid tokens per modality]
        self.register_buffer("_counters", torch.zeros(2 * self.num_experts + 2 * len(self.modalities)),
                             persistent=False)
        self.register_buffer("_eval_counters", torch.zeros(2), persistent=False)
        # Global ranks of the expert-parallel group, on the module's device: `_agree` reads their rows on
        # every training forward (a buffer, so it follows `.to(device)` and is not rebuilt per call).
        self.register_buffer("_ep_members", torch.zeros(0, dtype=torch.long), persistent=False)
        self._index_cache: dict[tuple, TokenIndex] = {}  # token maps per segment layout (`_token_index`)
        # The selection bias moves only while the experts train (set by `s3dist.dist.build_engine`): it exists
        # to spread the load the experts learn from. Stage 2 trains the routers alone on an objective with no
        # balance term (the paper's Selection lets experts be used unevenly; stages.select_balance_weight is
        # its opt-in), and a bias still chasing balance there would undo the selectivity Stage 2 learns.
        self.bias_updates = True
        # moe.balance. Only 'bias' adds state: the persistent buffer `route_bias` [num_experts] (not named
        # *expert*: DeepSpeed files every MoE state key containing 'expert' with the experts, and this one
        # belongs to the replicated model states). Without it the state dict is unchanged, so checkpoints of
        # aux_loss runs keep loading.
        if balance not in ("aux_loss", "bias", "none"):
            raise ValueError(f"moe.balance must be aux_loss, bias or none, not {balance!r}")
        self.balance = balance
        self.bias_update_rate = bias_update_rate
        if balance == "bias":
            self.register_buffer("route_bias", torch.zeros(self.num_experts))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # A resume that switches moe.balance (allowed with --force-config) loads: a checkpoint without a bias
        # starts it at zero, a bias in the checkpoint of a run that no longer uses one is ignored.
        key = prefix + "route_bias"
        if getattr(self, "route_bias", None) is not None:
            state_dict.setdefault(key, torch.zeros_like(self.route_bias))
        else:
            state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # DeepSpeed sets the expert-parallel group once the process groups exist; allow re-setting
    # (unlike TopKGate) because eval, export and the engine may each attach the same module.
    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group
        ranks = dist.get_process_group_ranks(ep_group) if ep_group is not None else []
        self._ep_members = torch.tensor(ranks, dtype=torch.long, device=self._counters.device)

    def offset(self, modality: str) -> int:
        return 0 if self.shared else self.modalities.index(modality) * self.n

    def logits(self, tokens: torch.Tensor, ix: TokenIndex) -> torch.Tensor:
        """Every token's router logits over its own modality's N experts [S, N], float32. When the segments
        are the router's modalities in order with equal token counts (equal lengths: the usual case), one
        batched GEMM; otherwise one GEMM per segment."""
        x = tokens.float()
        if self.noisy_gate == "jitter" and self.training:
            x = x * torch.empty_like(x).uniform_(1.0 - 1e-2, 1.0 + 1e-2)
        w = self.proj.float()
        if ix.stacked:
            return torch.bmm(x.view(len(ix.sizes), -1, x.shape[-1]), w.transpose(1, 2)).view(-1, self.n)
        per_modality = dict(zip(self.modalities, w.unbind(0)))
        return torch.cat([F.linear(xs, per_modality[m]) for m, xs in zip(ix.modalities, x.split(ix.sizes))])

    def select(self, probs: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k routes of each token: (gate probabilities [S, k], expert indices within the modality's
        block [S, k]), `bias` the selection bias of the token's block, one row [N] or one row per token
        [S, N] (None without one). With a bias the experts are chosen by probability + bias, the gates are the
        unbiased probabilities of the chosen experts (DeepSeek-V3: the bias steers load, never the output's
        weighting)."""
        if bias is None:
            return probs.topk(self.k, dim=-1)
        top_i = (probs + bias).topk(self.k, dim=-1).indices
        return probs.gather(1, top_i), top_i

    # ------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, used_token: torch.Tensor | None = None,
                sparse_routes: bool = True, use_tutel: bool = False):
        if not sparse_routes or use_tutel:
            raise RuntimeError("S3Router only serves DeepSpeed's sparse-route dispatch (deepspeed>=0.19,<0.20)")
        plan = self.plan
        if plan is None:
            raise RuntimeError("S3Router called without a RoutingPlan: call it through ExpertParallelMoE")
        total = sum(s.tokens for s in plan.segments)
        if total != tokens.shape[0]:
            raise RuntimeError(f"RoutingPlan covers {total} tokens but the layer got {tokens.shape[0]}")
        valid = (torch.ones(total, dtype=torch.bool, device=tokens.device) if used_token is None
                 else used_token.reshape(-1).bool())
        prune = plan.prune
        ix = self._token_index(plan.segments, tokens.device)
        nseg = len(ix.segments)

        logits, probs, probs_valid, top_p, top_i, vf, scores = self._route(tokens, valid, ix)
        self.sample_scores = dict(zip(ix.modalities, scores.split(ix.batches)))
        selected = valid.unsqueeze(1).expand_as(top_i)
        # the selected routes Stage 3 keeps; no extra work on the training path
        route_on = selected & _prune_keep(prune, ix, top_p, top_i, scores) if prune is not None else selected
        # Routes per (segment, expert) before capacity, only those really taken, in one scatter_add (no boolean
        # indexing, so no host sync on GPU); `demand` is the same per expert of the layer's pool.
        seg_demand = count_routes(top_i + ix.segment_of.unsqueeze(1) * self.n, route_on, nseg * self.n)
        demand = torch.zeros(self.num_experts, device=tokens.device).index_add_(0, ix.expert_of_block, seg_demand)
        idx = top_i + ix.offset_of.unsqueeze(1)
        gates = top_p
        valid_counts = probs.new_zeros(nseg).index_add_(0, ix.segment_of, vf)

        # The two statistics the ranks must agree on, in one collective where possible (see _agree).
        balance = torch.cat([seg_demand, valid_counts]) if self.training and nseg else None
        cap_stat, balance, world = self._agree(self._capacity_stat(plan, demand), balance)
        capacity = self._capacity(cap_stat)
        locations = self._locations(idx, route_on)
        fits = (locations < capacity) | ~route_on  # a route not taken holds no slot (its queue place is a dummy)
        # The top-k gates are normalised over the routes that survive capacity; a pruned route keeps its
        # place in that sum unless prune_renormalize, so pruning removes a path's contribution and leaves
        # the kept paths' weights as they were. A token with nothing left gets zeros.
        norm_on = selected & fits if prune is not None and not prune.renormalize else route_on & fits
        route_on = route_on & fits
        # torch.where, not a product with the bool masks: a mixed-dtype product converts the mask first
        denom = torch.where(norm_on, gates, 0.0).sum(-1, keepdim=True).clamp_min(torch.finfo(gates.dtype).eps)
        gates = torch.where(route_on, gates, 0.0) / denom
        kept = count_routes(idx, route_on, self.num_experts)
        if not self.training:
            self._count_eval(demand.sum(), kept.sum())

        if balance is not None:
            prob_sums = probs.new_zeros(nseg, self.n).index_add_(0, ix.segment_of, probs_valid)
            l_aux = self._balance_loss(prob_sums, balance, world)
            if self.balance == "bias" and self.bias_updates:
                self._update_bias(ix, balance)
        else:
            l_aux = demand.new_zeros(())
        self.z_loss = tokens.new_zeros(())
        if self.compute_z_loss and nseg:
            # logsumexp(logits) = logit_i - log p_i for any i; the top-1 (p >= 1/N) needs no second
            # exp-sum over the logits. A biased selection's first choice may have p ~ 0: exp-sum then.
            lse = (logits.logsumexp(-1) if self.balance == "bias" else
                   logits.gather(1, top_i[:, :1]).squeeze(1) - top_p[:, 0].log())
            self.z_loss = (lse.square() * vf).sum() / valid_counts.sum().clamp_min(1)
        if self.training:
            with torch.no_grad():  # router entropy and valid tokens per modality, for the load counters
                ent = -(probs * probs.clamp_min(1e-9).log()).sum(-1) * vf
                per_mod = torch.zeros(2, len(self.modalities), device=tokens.device)
                per_mod.index_add_(1, ix.modality_of, torch.stack([ent, vf]))
                self._counters += torch.cat([demand, kept, per_mod.flatten()])

        # DeepSpeed takes [k, S] int32 routes: transpose and convert in one copy
        indices = torch.where(route_on, idx, -1).t().to(torch.int32, memory_format=torch.contiguous_format)
        locs = torch.where(route_on, locations, 0).t().to(torch.int32, memory_format=torch.contiguous_format)
        return l_aux, capacity, self.num_experts, indices, locs, gates.t().contiguous(), demand

    def _route(self, tokens: torch.Tensor, valid: torch.Tensor, ix: TokenIndex) -> Routed:
        """What the forward routes by and Stage 3 ranks (`unit_scores`), computed in one place.

        All segments at once: each token's logits over its own modality's N experts, then one softmax, one
        top-k, and the per-sample sums by index_add over the token -> sample map (a loop of these small ops
        per segment was most of the router's dispatches, and the router most of the layer's)."""
        logits = self.logits(tokens, ix) if ix.modalities else tokens.new_zeros(0, self.n, dtype=torch.float32)
        probs = logits.softmax(dim=-1)
        top_p, top_i = self.select(probs, ix.bias_rows(getattr(self, "route_bias", None)))
        vf = valid.to(probs.dtype)
        probs_valid = probs * vf.unsqueeze(1)
        steps = probs.new_zeros(ix.samples).index_add_(0, ix.sample_of, vf).clamp_min(1.0)
        scores = probs.new_zeros(ix.samples, self.n).index_add_(0, ix.sample_of, probs_valid)
        return Routed(logits, probs, probs_valid, top_p, top_i, vf, scores / steps.unsqueeze(1))

    def unit_scores(self, segments: list[Segment], tokens: torch.Tensor, valid: torch.Tensor, unit: str
                    ) -> dict[str, torch.Tensor]:
        """The scores Stage 3 ranks, per modality, as one flat tensor, computed exactly as the forward
        computes what it routes and prunes by (no dispatch, no collective): 'token_pairs': the gate
        probability of each (valid token, selected expert) pair; 'sample_pairs': each (sample with a real
        step, expert) pair's mean gate probability."""
        ix = self._token_index(segments, tokens.device)
        valid = valid.reshape(-1).bool()
        r = self._route(tokens, valid, ix)
        if unit == "token_pairs":
            per_token = zip(r.top_p.split(ix.sizes), valid.split(ix.sizes))
            return {m: p[v].reshape(-1) for m, (p, v) in zip(ix.modalities, per_token)}
        real = torch.zeros(ix.samples, device=r.vf.device).index_add_(0, ix.sample_of, r.vf) > 0  # a real step
        return {m: s[keep].reshape(-1)
                for m, s, keep in zip(ix.modalities, r.scores.split(ix.batches), real.split(ix.batches))}

    def _token_index(self, segments: list[Segment], device: torch.device) -> TokenIndex:
        """The layer's token maps for these segments, built once per segment layout and device (a training
        run has one or two layouts: its batch, and an uneven last batch; evaluation a few more)."""
        key = (tuple((s.modality, s.batch, s.steps) for s in segments), str(device))
        ix = self._index_cache.get(key)
        if ix is None:
            if len(self._index_cache) >= 8:
                self._index_cache.pop(next(iter(self._index_cache)))
            ix = self._index_cache[key] = TokenIndex.build(self, segments, device)
        return ix

    # ------------------------------------------------------------------------------------------
    def _capacity_stat(self, plan: RoutingPlan, demand: torch.Tensor) -> torch.Tensor:
        """What capacity is sized from, before the MAX over the expert-parallel group. Evaluation never
        drops: representations of every method are extracted with all their routes."""
        if self.drop_tokens and self.training:
            # Sized from the largest per-modality token count across EP ranks, so a rank holding a
            # short or empty batch still sends buffers of the agreed shape.
            local = [0] * len(self.modalities)
            for seg in plan.segments:
                local[self.modalities.index(seg.modality)] += seg.tokens
            return torch.tensor(local, dtype=torch.float32, device=demand.device)
        return demand.max().reshape(1) if demand.numel() else demand.new_zeros(1)

    def _agree(self, cap_stat: torch.Tensor, balance: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """MAX of `cap_stat` over the expert-parallel group (every EP rank must size its all-to-all
        buffers alike) and SUM of the balance statistics over the world (exact global routing
        fractions). Returns both and the world size.

        In training both are needed, and one blocking collective serves both: a SUM over the world
        of [balance | a world x len(cap_stat) table where each rank fills only its own row]; the EP
        group's MAX is then read off its members' rows. One host sync per MoE layer instead of two."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        ep_wide = self.ep_group is not None and dist.get_world_size(self.ep_group) > 1
        if balance is not None and world > 1:
            if not ep_wide:
                dist.all_reduce(balance)
                return cap_stat, balance, world
            table = cap_stat.new_zeros(world, cap_stat.numel())
            table[dist.get_rank()] = cap_stat
            vec = torch.cat([balance, table.flatten()])
            dist.all_reduce(vec)
            rows = vec[balance.numel():].view(world, -1)
            return rows.index_select(0, self._ep_members).amax(0), vec[:balance.numel()], world
        if ep_wide:
            dist.all_reduce(cap_stat, op=dist.ReduceOp.MAX, group=self.ep_group)
        return cap_stat, balance, world

    def _capacity(self, stat: torch.Tensor) -> int:
        """Per-expert slots from the agreed statistic; the same number on every expert-parallel rank."""
        if self.drop_tokens and self.training:
            per_mod = [math.ceil(self.capacity_factor * self.k * s / self.n) for s in stat.tolist()]
            cap = max(per_mod) if per_mod else 0
        else:
            cap = int(stat.item())
        return max(cap, self.min_capacity, 1)

    def _locations(self, idx: torch.Tensor, route_on: torch.Tensor) -> torch.Tensor:
        """Each route's slot in its expert's queue: first choices first, then second choices, ...

        A stable sort by expert gives queue positions in O(S*k) memory (a one-hot cumsum would be
        O(S*k*E)).
        """
        s, k = idx.shape
        flat = torch.where(route_on, idx, torch.full_like(idx, self.num_experts)).t().reshape(-1)  # k-major
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1)
        starts = torch.cumsum(counts, 0) - counts
        pos_sorted = torch.arange(flat.numel(), device=idx.device) - starts[flat[order]]
        pos = torch.empty_like(pos_sorted).scatter_(0, order, pos_sorted)
        return pos.view(k, s).t()

    def _balance_loss(self, prob_sums: torch.Tensor, stat: torch.Tensor, world: int) -> torch.Tensor:
        """Switch-style balance loss per modality segment on global fractions, summed over segments and
        scaled so that its mean over data-parallel ranks is the loss of the whole global batch (DeepSpeed
        averages gradients).

        `prob_sums` [segments, N] is this rank's sum of gate probabilities over its valid tokens; `stat` is
        (per-segment demand, per-segment token counts) summed over the whole world (by `_agree`): the routing
        fractions it gives are exact for the global batch, not a per-rank estimate."""
        nseg = prob_sums.shape[0]
        g_demand = stat[:nseg * self.n].view(nseg, self.n)
        n_tok = stat[nseg * self.n:].clamp_min(1.0).unsqueeze(1)
        me = prob_sums / n_tok                      # this rank's share of the global mean probability
        ce = g_demand / (n_tok * self.k)            # global fraction of routes per expert
        return world * self.n * (me * ce).sum()

    @torch.no_grad()
    def _update_bias(self, ix: TokenIndex, stat: torch.Tensor) -> None:
        """bias_e += gamma * sign(mean load - load_e) within each modality's block of experts (the experts a
        modality's tokens compete for; with shared_experts, the one pool), from `stat`, the balance
        statistics `_agree` summed over the world: every rank applies the same update to the same bias.

        Called once per training forward, i.e. once per optimizer step (s3dist runs one forward per step:
        no gradient accumulation, both Stage-1 views in one call, no activation recomputation). The new bias
        steers the next step's selection; this step's routes are already chosen. Were gradient accumulation
        added, this would move the bias once per micro-batch (gamma x accumulation steps per step, and a
        selection that changes inside one step): the update would then belong at the accumulation boundary,
        from the load summed over the micro-batches. A step skipped for a non-finite loss still moves it (the
        route counts are finite whatever the loss)."""
        g_demand = stat[:len(ix.segments) * self.n]
        load = torch.zeros(self.num_experts, device=stat.device).index_add_(0, ix.expert_of_block, g_demand)
        blocks = load.view(-1, self.n)   # a block no token reached this step has error 0: no move
        self.route_bias += self.bias_update_rate * torch.sign(blocks.mean(1, keepdim=True) - blocks).flatten()

    def pop_load_counters(self) -> torch.Tensor:
        """Counters since the last call (local to this rank; the logger reduces them once)."""
        out = self._counters.clone()
        self._counters.zero_()
        return out


def _prune_keep(prune: PruneSpec, ix: TokenIndex, top_p: torch.Tensor, top_i: torch.Tensor,
                sample_scores: torch.Tensor) -> torch.Tensor:
    """bool [S, k]: which selected routes Stage 3 keeps. A modality without a threshold keeps all."""
    thr = torch.tensor([prune.thresholds.get(m, -math.inf) for m in ix.modalities], device=top_p.device)
    if prune.unit == "token_pairs":
        return top_p >= thr.index_select(0, ix.segment_of).unsqueeze(1)
    keep_pair = sample_scores >= thr.index_select(0, ix.segment_of_sample).unsqueeze(1)   # [samples, N]
    return keep_pair.index_select(0, ix.sample_of).gather(1, top_i)


class Routed(NamedTuple):
    """`S3Router._route`: the routing of a layer's tokens before capacity."""

    logits: torch.Tensor        # [S, N] each token over its own modality's N experts (float32)
    probs: torch.Tensor         # [S, N] softmax
    probs_valid: torch.Tensor   # [S, N] zero on padded / unused tokens
    top_p: torch.Tensor         # [S, k] the selected routes' gates (unbiased probabilities)
    top_i: torch.Tensor         # [S, k] their experts within the modality's block
    vf: torch.Tensor            # [S] 1.0 for a valid token
    scores: torch.Tensor        # [samples, N] mean gate probability per (sample, expert)


@dataclass
class TokenIndex:
    """Where each token of a layer's token matrix belongs, for one layout of segments (`S3Router` builds
    it once per layout and device and keeps it): the maps that let the router's per-segment statistics
    be one `index_add_` over all tokens."""

    segments: list[Segment]
    modalities: list[str]            # per segment
    sizes: list[int]                 # tokens per segment
    batches: list[int]               # samples per segment
    samples: int
    n: int                           # experts per modality block
    segment_of: torch.Tensor         # [S] segment of each token
    sample_of: torch.Tensor          # [S] sample (over all segments) of each token
    segment_of_sample: torch.Tensor  # [samples]
    modality_of: torch.Tensor        # [S] index in the router's modalities
    block_of: torch.Tensor           # [S] the token's block of N experts in the layer's pool
    offset_of: torch.Tensor          # [S] first expert of that block
    expert_of_block: torch.Tensor    # [segments * N] pool expert of (segment, j)
    stacked: bool                    # the router's modalities in order, equal token counts: [M, S/M] tokens

    @classmethod
    def build(cls, router: S3Router, segments: list[Segment], device: torch.device) -> TokenIndex:
        seg = torch.arange(len(segments))
        sizes = torch.tensor([s.tokens for s in segments], dtype=torch.long)
        batches = torch.tensor([s.batch for s in segments], dtype=torch.long)
        block = torch.tensor([router.offset(s.modality) // router.n for s in segments], dtype=torch.long)
        modality = torch.tensor([router.modalities.index(s.modality) for s in segments], dtype=torch.long)
        segment_of_sample = seg.repeat_interleave(batches)
        steps_of_sample = torch.tensor([s.steps for s in segments], dtype=torch.long).repeat_interleave(batches)
        segment_of = seg.repeat_interleave(sizes)
        maps = {"segment_of": segment_of, "sample_of": torch.arange(len(segment_of_sample)).repeat_interleave(
                    steps_of_sample), "segment_of_sample": segment_of_sample, "modality_of": modality[segment_of],
                "block_of": block[segment_of], "offset_of": block[segment_of] * router.n,
                "expert_of_block": (block.unsqueeze(1) * router.n + torch.arange(router.n)).flatten()}
        stacked = [s.modality for s in segments] == router.modalities and len(set(sizes.tolist())) == 1
        return cls(list(segments), [s.modality for s in segments], sizes.tolist(), batches.tolist(),
                   int(batches.sum()), router.n, **{k: v.to(device) for k, v in maps.items()}, stacked=stacked)

    def bias_rows(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Each token's row [S, N] of the selection bias (None without one)."""
        return None if bias is None else bias.view(-1, self.n).index_select(0, self.block_of)


def count_routes(idx: torch.Tensor, route_on: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert (float32) among those with `route_on`; exact up to 2**24 routes per expert."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=idx.device)
    return counts.scatter_add_(0, idx.reshape(-1).long(), route_on.reshape(-1).to(torch.float32))
