"""Run configuration: one dataclass per component, composed into `RunConfig`.

Precedence is defaults < `--config FILE.yaml` < dotted CLI overrides (`moe.num_experts=16`).
Every field carries its documentation and its allowed range in `dataclasses.field(metadata=...)`
(built by `_f`), so validation, `s3dist config --help`-style listings and the tests all read
the same source. Validation happens here, before any process group starts: an unknown key, a
wrong type or an out-of-range value raises `ConfigError` naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key, value or file is invalid; the message says which and how to fix it."""


def _f(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
       gt: float | None = None, le: float | None = None, lt: float | None = None):
    """A documented config field. `default` may be a list (copied per instance)."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# Seeds are non-negative and below 2**32: what numpy's legacy generators and every torch generator take.
SEED_BOUND = 2 ** 32

# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """The synthetic data sets (see `s3dist.data.synth` for both mechanisms). `kind` picks the generator;
    fields marked "concepts kind" or "factors kind" are read by that generator only."""

    kind: str = _f("concepts", "Generator: 'concepts' (binary concepts seen by every modality, binary label) or "
                               "'factors' (FactorCL-style shared / modality-unique / nuisance Gaussian factors; "
                               "8-class label from shared and unique factors, see label_mode).",
                   choices=("concepts", "factors"))
    num_train: int = _f(4096, "Training samples generated.", ge=8)
    num_val: int = _f(512, "Validation samples (probe regularisation is chosen on these).", ge=8)
    num_test: int = _f(1024, "Test samples (probe accuracy is reported on these).", ge=8)
    num_concepts: int = _f(8, "Concepts kind: K latent concepts shared by all modalities.", ge=2, le=64)
    concept_rate: float = _f(0.25, "Concepts kind: probability that a sample activates each concept.",
                             gt=0.0, lt=1.0)
    label_concepts: int = _f(2, "Concepts kind: the label is 1 when any of the first `label_concepts` concepts "
                                "is active.", ge=1)
    seq_len: int = _f(16, "Time steps per sequence (padded at the front, as MultiBench does).", ge=1, le=512)
    modality_dims: list = _f([24, 16, 12], "Feature width of each synthetic modality (one entry per modality).")
    shared_dim: int = _f(4, "Factors kind: shared factors s ~ N(0, I), seen by every modality.", ge=1, le=64)
    unique_dim: int = _f(4, "Factors kind: unique factors u_m ~ N(0, I) per modality, independent across "
                            "modalities.", ge=0, le=64)
    label_mode: str = _f("shared_unique", "Factors kind: the 8-class label's 3 sign bits: 'shared_unique' (shared "
                                          "factor 0, unique factor 0 of the first and of the second modality) or "
                                          "'shared' (the control: shared factors 0, 1, 2).",
                         choices=("shared_unique", "shared"))
    nuisance_dim: int = _f(4, "Modality-private nuisance factors per modality (never in the label).", ge=0)
    nuisance_scale: float = _f(1.0, "Amplitude of the nuisance factors relative to the concept signal (concepts "
                                    "kind) or to the unit-variance shared and unique factors (factors kind).",
                               ge=0.0)
    noise_std: float = _f(0.3, "Std of i.i.d. Gaussian observation noise.", ge=0.0)
    rows_per_shard: int = _f(1024, "Rows per Parquet shard written by the generator.", ge=1)
    seed: int = _f(0, "Seed of the generator (mixing weights, samples, splits).", ge=0, lt=SEED_BOUND)


@dataclass
class DataConfig:
    path: str = _f("", "URL (any fsspec URL) of a data set folder holding manifest.json. Empty: the "
                       "embedded synthetic default is generated into <output_dir>/data.")
    modalities: list = _f([], "Modalities to use; empty means every modality in the manifest.")
    batch_size: int = _f(64, "Per-rank batch size (the contrastive batch is this times the world size).", ge=1)
    eval_batch_size: int = _f(256, "Per-rank batch size for representation extraction.", ge=1)
    shuffle_buffer: int = _f(1024, "Rows in the streaming shuffle buffer (0 disables shuffling).", ge=0)
    nonfinite: str = _f("error", "NaN / inf in features: 'error' stops with the count, 'zero' replaces them.",
                        choices=("error", "zero"))
    prefetch: int = _f(2, "Batches a background thread reads, shuffles and decodes ahead of the training "
                          "step (Parquet decoding releases the GIL, so it overlaps the step), and the next "
                          "epoch's reader starts while the last of them are trained on; 0 reads in the "
                          "training thread.", ge=0, le=64)
    read_threads: int = _f(2, "Threads decoding this rank's Parquet shards in parallel (each its own datasets "
                              "stream over part of the shards; batches are the same for any value). Used where "
                              "ranks get whole shards (shard count a multiple of the world size) and prefetch > "
                              "0; at most one per shard of the rank.", ge=1, le=64)
    partitions: int = _f(0, "Streams the training rows are dealt into, fixed when a run starts (0: the world size "
                            "it starts with). A run resumes mid-epoch on any world size dividing it without "
                            "repeating or skipping a sample (set e.g. 8 for a run that may move between 1, 2, 4 "
                            "and 8 ranks); it must be a multiple of the world size. Whole shards per partition where the shard "
                            "count is a multiple of it, else every partitions-th row (each rank then reads every "
                            "shard).", ge=0)
    synth: SynthConfig = field(default_factory=SynthConfig, metadata={"doc": "Embedded synthetic data set."})


@dataclass
class ModelConfig:
    arch: str = _f("transformer", "Encoder per modality: 'transformer' (the paper's form: input projection, "
                                  "positions, `num_layers` pre-norm blocks of masked self-attention + an MoE FFN, "
                                  "residuals around both) or 'stem' (the earlier form: a conv / GRU stem, then "
                                  "`num_layers` residual MoE blocks without attention; kept for ablation).",
                   choices=("transformer", "stem"))
    d_model: int = _f(64, "Width of the latent space shared by all modalities (expert input and output).", ge=4)
    num_layers: int = _f(2, "Blocks per encoder; each holds one MoE layer (one all-to-all pair for all modalities).",
                         ge=1, le=16)
    num_heads: int = _f(4, "'transformer': attention heads (must divide d_model).", ge=1)
    representation: str = _f("residual", "What is pooled into the representation: 'residual' (the final normed "
                                         "residual stream: a pruned routing path removes only its contribution; the "
                                         "paper's form) or 'expert_output' (the last MoE layer's bare output, the "
                                         "earlier form: pruning then deletes representation mass; ablation).",
                              choices=("residual", "expert_output"))
    temporal: str = _f("conv", "'stem' only: temporal encoder before the MoE blocks: 'conv' (causal depthwise "
                               "conv + MLP), 'gru', or 'none'.", choices=("conv", "gru", "none"))
    temporal_kernel: int = _f(3, "'stem' only: kernel width of the 'conv' temporal encoder.", ge=1, le=31)
    tokens: str = _f("step", "Token granularity: 'step' (one token per time step, pooled at the end) or 'pooled' "
                             "(one token per sample and modality after the input projection / stem).",
                     choices=("step", "pooled"))


@dataclass
class MoEConfig:
    kind: str = _f("s3", "Encoder kind: 's3' (S3 router: keep-masks, compactness, global aux loss), 'topk' "
                         "(DeepSpeed's own TopKGate, the plain-MoE baseline) or 'dense' (no MoE: an MLP with "
                         "the active parameters of k experts).", choices=("s3", "topk", "dense"))
    granularity: int = _f(2, "chi: granularity. With `num_experts`=0, N = chi * rho; with `top_k`=0, k = chi.", ge=1)
    expansion: int = _f(2, "rho: expansion factor (see `granularity`).", ge=1)
    num_experts: int = _f(0, "Experts per modality (N). 0 derives it as granularity * expansion.", ge=0)
    top_k: int = _f(0, "Experts each token is routed to (k). 0 derives it as granularity.", ge=0)
    expert_hidden: int = _f(128, "Hidden width of each expert MLP.", ge=1)
    shared_experts: bool = _f(False, "True: all modalities route into one pool of N experts. False (default): "
                                     "each modality owns N experts; all still map into the shared latent space. "
                                     "The paper's exact choice is not public.")
    capacity_factor: float = _f(1.25, "Training capacity factor: each expert takes at most "
                                      "ceil(cf * k * tokens / N) tokens per rank.", gt=0.0)
    eval_capacity_factor: float = _f(2.0, "Unused by the S3 router (kept for DeepSpeed's gate signature): "
                                          "evaluation never drops tokens, so every method's representation is "
                                          "extracted with all its routes.", gt=0.0)
    min_capacity: int = _f(4, "Lower bound on the per-expert capacity.", ge=0)
    drop_tokens: bool = _f(True, "Drop tokens over capacity. False sizes capacity to the largest demand across "
                                 "expert-parallel ranks (no drops, one extra tiny all-reduce).")
    expert_compute: str = _f("auto", "How a layer's local experts run: 'grouped' (one batched GEMM per "
                                     "projection over all local experts), 'loop' (DeepSpeed's per-expert loop) "
                                     "or 'auto' (grouped on CUDA; on CPU only for small per-expert GEMMs, where it "
                                     "measured faster: s3dist/model/experts.py). Same results either way.",
                             choices=("auto", "loop", "grouped"))
    noisy_gate: str = _f("none", "Router noise in training: 'none' or 'jitter' (multiplicative input jitter).",
                         choices=("none", "jitter"))
    balance: str = _f("aux_loss", "Stage 1 load balancing: 'aux_loss' (the Switch-style loss on global routing "
                                  "fractions, weight aux_loss_weight), 'bias' (DeepSeek-V3's auxiliary-loss-free "
                                  "rule: a per-expert bias added to the routing scores for top-k selection only, "
                                  "moved by bias_update_rate each training step against the global load error; "
                                  "moe.kind=s3 only) or 'none'. With 'bias' / 'none' the aux loss is logged but "
                                  "not applied.", choices=("aux_loss", "bias", "none"))
    bias_update_rate: float = _f(1e-3, "balance=bias: gamma, the step of the per-expert selection bias per training "
                                       "step (in units of routing probability).", gt=0.0)
    aux_loss_weight: float = _f(0.01, "Weight of the load-balancing loss (applied with balance=aux_loss only).",
                                ge=0.0)
    z_loss_weight: float = _f(0.0, "Weight of the router z-loss (mean squared logsumexp of router logits).", ge=0.0)
    init_seed: int = _f(1234, "Seed for expert weights; expert e's weights depend only on it and e, never on "
                              "ep_size.", ge=0, lt=SEED_BOUND)

    def resolved_num_experts(self) -> int:
        return self.num_experts or self.granularity * self.expansion

    def resolved_top_k(self) -> int:
        return self.top_k or self.granularity

    def total_experts(self, num_modalities: int) -> int:
        """Experts of one MoE layer over all modalities: one pool the modalities share (S3 with
        shared_experts), else N per modality."""
        n = self.resolved_num_experts()
        return n if self.kind == "s3" and self.shared_experts else n * num_modalities


@dataclass
class OptimConfig:
    lr: float = _f(2e-3, "Peak learning rate of Stage 1 (AdamW).", gt=0.0)
    router_lr: float = _f(5e-3, "Peak learning rate of Stage 2 (routers only).", gt=0.0)
    weight_decay: float = _f(0.01, "AdamW weight decay.", ge=0.0)
    beta1: float = _f(0.9, "AdamW beta1.", ge=0.0, lt=1.0)
    beta2: float = _f(0.98, "AdamW beta2.", ge=0.0, lt=1.0)
    warmup_steps: int = _f(20, "Linear warm-up steps at the start of each training stage.", ge=0)
    grad_clip: float = _f(1.0, "Global gradient-norm clip (0 disables).", ge=0.0)
    nonfinite_loss: str = _f("skip", "Non-finite loss: 'skip' the step and count it, or 'stop' after saving "
                                     "the offending batch for inspection.", choices=("skip", "stop"))


@dataclass
class StagesConfig:
    run: list = _f(["specialize", "select", "sparsify"], "Stages to run, in order, from "
                   "specialize / select / sparsify.")
    specialize_steps: int = _f(150, "Stage 1 (Specialization) optimizer steps.", ge=0)
    select_steps: int = _f(60, "Stage 2 (Selection, routers only) optimizer steps.", ge=0)
    keep_fraction: float = _f(0.3, "Stage 3: fraction p of routing units kept (see prune_unit); 0 keeps none "
                                    "(the representation is then the residual stream without the pruned layers' "
                                    "expert contributions).", ge=0.0, le=1.0)
    prune_unit: str = _f("token_pairs", "Stage 3 unit: 'token_pairs' (the paper: the router's selected top-k "
                                        "(token, expert) pairs, ranked by gate score) or 'sample_pairs' (the earlier "
                                        "form: (sample, expert) pairs ranked by mean gate probability over all N "
                                        "experts).", choices=("token_pairs", "sample_pairs"))
    prune_layers: str = _f("all", "Stage 3: prune in 'all' MoE layers (our reading of the paper) or only the "
                                  "'last'.", choices=("all", "last"))
    prune_renormalize: bool = _f(False, "Stage 3: renormalise the kept gates of a token to sum to 1. False (default): "
                                        "a kept path keeps its unpruned gate, so pruning only removes contributions.")
    prune_threshold: str = _f("calibrated", "Stage 3 threshold: 'batch' (the paper's rule: the top p of each "
                                            "evaluation batch, one threshold agreed by all ranks) or 'calibrated' "
                                            "(each layer's threshold fixed on the training split, layer by layer, "
                                            "then applied to every split: a sample's representation does not "
                                            "depend on its batch-mates, the eval batch size or the number of "
                                            "ranks).", choices=("calibrated", "batch"))
    temperature: float = _f(0.1, "Temperature of the InfoNCE / SupCon losses.", gt=0.0)
    intra_weight: float = _f(1.0, "Weight of intra-modal InfoNCE (two augmented views).", ge=0.0)
    cross_weight: float = _f(1.0, "Weight of cross-modal InfoNCE.", ge=0.0)
    supcon_weight: float = _f(1.0, "Stage 2: weight of the cross-modal supervised contrastive loss.", ge=0.0)
    select_target: str = _f("label", "Stage 2: what the supervised contrastive loss calls the same: 'label' (the "
                                     "task label, the method) or 'concepts' (a diagnostic for data sets with "
                                     "generating concepts, i.e. synthetic ones: pairs are positive in proportion "
                                     "to the Jaccard overlap of their active concepts).",
                          choices=("label", "concepts"))
    compact_weight: float = _f(1.0, "Stage 2: weight alpha of the compactness (minimality) term; the paper's value "
                                     "is not public.", ge=0.0)
    compactness: str = _f("vmf", "Stage 2 compactness form: 'vmf' (the paper: -<unit z_i^m, normalised class mean "
                                 "of the other modality's z over the global batch>, both directions), or the earlier "
                                 "ablations on routing mass: 'entropy' (mean per-sample routing entropy) and "
                                 "'mutual_info' (minus the entropy of the batch-mean routing too).",
                          choices=("vmf", "entropy", "mutual_info"))
    select_balance_weight: float = _f(0.0, "Stage 2: weight of the load-balancing loss. 0 (the paper): experts may "
                                           "now be used unevenly.", ge=0.0)
    time_mask: float = _f(0.2, "Augmentation: fraction of time steps masked in each view.", ge=0.0, lt=1.0)
    feature_dropout: float = _f(0.1, "Augmentation: feature dropout probability.", ge=0.0, lt=1.0)
    noise_std: float = _f(0.05, "Augmentation: Gaussian noise std.", ge=0.0)


@dataclass
class EvalConfig:
    run_at_end: bool = _f(True, "Evaluate (probe + sparsity sweep) when training ends.")
    keep_fractions: list = _f([0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.9, 1.0], "Keep fractions p of the sparsity sweep "
                                                                         "(0 keeps no routing unit).")
    probe_Cs: list = _f([0.01, 0.1, 1.0, 10.0], "Inverse regularisation strengths tried for the logistic-regression "
                                                "probe; the best on the validation split is used.")
    probe_max_iter: int = _f(2000, "Iterations of the probe's solver.", ge=10)


@dataclass
class CheckpointConfig:
    every_steps: int = _f(50, "Save every N optimizer steps (0: only at stage ends).", ge=0)
    every_minutes: float = _f(0.0, "Also save when this many minutes passed since the last save (0: off).", ge=0.0)
    keep_last: int = _f(2, "Complete checkpoints kept; older ones are deleted after a new one is published.", ge=1)
    lock_stale_s: float = _f(300.0, "Run-directory lock (one job per output_dir): rank 0 refreshes its heartbeat "
                                    "every lock_stale_s/10; a holder on another host whose heartbeat is older than "
                                    "this is taken to be dead and its lock taken over (on the holder's own host a "
                                    "dead process is seen at once). Hosts' clocks must agree to well within it.",
                             gt=0.0)


@dataclass
class LoggingConfig:
    every_steps: int = _f(10, "Log interval in optimizer steps. Counters are reduced across ranks once per "
                              "interval.", ge=1)
    trackers: list = _f(["tensorboard"], "Where rank 0 also sends the scalars, the run config and the evaluation "
                                          "results: 'tensorboard' (<output_dir>/tb), 'wandb' (pip install "
                                          "'s3dist[wandb]'; W&B's WANDB_* variables apply, e.g. WANDB_MODE=offline; "
                                          "project 's3dist' unless WANDB_PROJECT), 'mlflow' (pip install "
                                          "'s3dist[mlflow]'; MLFLOW_TRACKING_URI, default file:<output_dir>/mlruns). "
                                          "<output_dir>/metrics.jsonl is always written ('jsonl' may be listed): it "
                                          "is the run's time series.")
    tensorboard: bool = _f(True, "Older switch, kept so existing config files load: false drops 'tensorboard' from "
                                 "logging.trackers; true changes nothing.")
    progress: bool = _f(True, "Progress bar on rank 0 (only when stdout is a terminal).")
    sample_ids: bool = _f(False, "Write each training batch's sample ids per rank to <output_dir>/samples/"
                                 "rank{r}.jsonl (step, stage, ids): an audit of the data order, e.g. that a resume "
                                 "on another world size repeated or skipped no sample.")
    imbalance_threshold: float = _f(3.0, "Warn when an MoE layer's max/mean expert load stays above this...", gt=1.0)
    imbalance_patience: int = _f(3, "...for this many consecutive log intervals.", ge=1)

    # tracker -> the module it needs and the extra that installs it (None: always installed)
    TRACKER_PACKAGES = {"jsonl": None, "tensorboard": None, "wandb": ("wandb", "s3dist[wandb]"),
                        "mlflow": ("mlflow", "s3dist[mlflow]")}

    def resolved_trackers(self) -> list[str]:
        """The trackers to start besides metrics.jsonl, in the order given, each once. Raises ConfigError for an
        unknown name or a tracker whose package is not installed (checked on every rank, so none waits)."""
        import importlib.util

        out = []
        for name in self.trackers:
            if not isinstance(name, str) or name not in self.TRACKER_PACKAGES:
                raise ConfigError(f"config key 'logging.trackers' holds {name!r}; allowed: "
                                  f"{list(self.TRACKER_PACKAGES)}")
            need = self.TRACKER_PACKAGES[name]
            if need is not None and importlib.util.find_spec(need[0]) is None:
                raise ConfigError(f"logging.trackers contains {name!r} but the {need[0]} package is not installed: "
                                  f"pip install '{need[1]}'")
            if name != "jsonl" and name not in out and not (name == "tensorboard" and not self.tensorboard):
                out.append(name)
        return out


@dataclass
class DistConfig:
    ep_size: int = _f(0, "Expert-parallel size. 0: the world size (all ranks share the experts). Must divide "
                         "the world size and the total number of experts.", ge=0)
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage (0, 1 or 2; stage 3 is not supported with DeepSpeed MoE).",
                         ge=0, le=3)
    backend: str = _f("auto", "Process-group backend: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' or 'gloo'.",
                      choices=("auto", "nccl", "gloo"))
    dtype: str = _f("fp32", "Training precision: 'fp32' or 'bf16' (bf16 needs CUDA).", choices=("fp32", "bf16"))
    bf16_grad_check: bool = _f(True, "bf16 only: DeepSpeed's per-parameter inf/NaN check of the gradients "
                                     "before each step (skips the step on overflow). false saves ~5 tiny kernels "
                                     "per parameter per step on GPUs; non-finite losses are still caught by "
                                     "optim.nonfinite_loss, non-finite gradients of a finite loss then are not.")
    timeout_s: int = _f(300, "Collective timeout: a rank that dies makes the others fail after this many seconds "
                             "instead of hanging.", ge=10)
    exit_with_launcher: bool = _f(True, "A training process started by torchrun / accelerate launch / s3dist.launch "
                                        "is killed as soon as that launcher dies (SIGKILL, OOM killer): torchrun "
                                        "starts workers in their own sessions, so they would train on, orphaned.")


@dataclass
class RunConfig:
    name: str = _f("s3", "Run name, used in the default output directory runs/<name>-<timestamp>.")
    output_dir: str = _f("", "Run directory. Empty: runs/<name>-<timestamp>.")
    seed: int = _f(0, "Global seed (data order, augmentations, non-expert init).", ge=0, lt=SEED_BOUND)
    resume: str = _f("", "'' (fresh run), 'auto' (continue from the newest complete checkpoint in output_dir, "
                         "if any) or a checkpoint directory.")
    overwrite: bool = _f(False, "Allow starting a fresh run in an output_dir that already holds a run.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "Data set and streaming."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "Encoders."})
    moe: MoEConfig = field(default_factory=MoEConfig, metadata={"doc": "Mixture-of-Experts layers."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"doc": "Optimizer and schedule."})
    stages: StagesConfig = field(default_factory=StagesConfig, metadata={"doc": "S3 stages and losses."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "Linear probe and sparsity sweep."})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "Checkpointing."})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"doc": "Metrics and progress."})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"doc": "Distributed setup."})


STAGE_NAMES = ("specialize", "select", "sparsify")

# --------------------------------------------------------------------------------------------
# Building: defaults < YAML < dotted overrides
# --------------------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any, from_cli: bool) -> Any:
    """Convert `value` to `typ` or raise ConfigError naming `key`. CLI strings are parsed as YAML scalars; a list
    key also takes a comma-separated string (from a recipe too: `run: specialize`) or a single number."""
    if isinstance(value, str) and typ is list:
        text = value.strip()
        value = yaml.safe_load(text) if text.startswith("[") else [yaml.safe_load(v) for v in text.split(",") if v]
    elif from_cli and isinstance(value, str) and typ is not str:
        value = yaml.safe_load(value) if value != "" else value
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
        if from_cli and value is not None:
            return str(value)
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # one number without brackets
            return [value]
    else:  # pragma: no cover - every field type is one of the above
        raise TypeError(f"unsupported config type {typ} for {key}")
    raise ConfigError(f"config key '{key}': expected {typ.__name__}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, key_prefix: str, updates: dict, from_cli: bool) -> None:
    fields = _field_types(type(obj))
    for name, value in updates.items():
        key = f"{key_prefix}{name}"
        if name not in fields:
            close = [n for n in fields if n.startswith(name[:3])]
            hint = f" Did you mean: {', '.join(key_prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: "
                              f"{', '.join(key_prefix + n for n in fields)}")
        f, typ = fields[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section: give a mapping, not {value!r}")
            _apply(getattr(obj, name), f"{key}.", value, from_cli)
        else:
            setattr(obj, name, _coerce(key, value, typ, from_cli))


def _nest(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' overrides a value and a section at once")
        node[parts[-1]] = value
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`['moe.num_experts=16', 'run.seed=3']` -> {'moe.num_experts': '16', ...}."""
    out = {}
    for a in args:
        if "=" not in a or a.startswith("="):
            raise ConfigError(f"override '{a}' is not of the form key=value (e.g. moe.num_experts=16)")
        k, v = a.split("=", 1)
        out[k.strip()] = v
    return out


class _RecipeLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last silently, so a recipe edited
    by appending `lr: ...` under an `optim:` that already had one would train with a value nobody reads first."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"key {key!r} is given twice (first on line {seen[key] + 1}); keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(config_file: str | None = None, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Defaults < YAML file < dotted overrides, then validated. Raises ConfigError on any problem."""
    cfg = RunConfig()
    if config_file:
        path = Path(config_file)
        if path.is_dir():
            raise ConfigError(f"config file '{config_file}' is a folder; give a YAML recipe, e.g. "
                              f"launch_configs/recipes/s3_synth.yaml")
        if not path.is_file():
            raise ConfigError(f"config file '{config_file}' does not exist")
        try:
            with open(path, encoding="utf-8") as f:  # from the file: the errors' marks name it, line and column
                doc = yaml.load(f, Loader=_RecipeLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{config_file}' is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{config_file}' is not a UTF-8 text file; give a YAML recipe") from e
        if not isinstance(doc, dict):
            raise ConfigError(f"config file '{config_file}' must hold a mapping of sections, got {type(doc).__name__}")
        try:
            _apply(cfg, "", doc, from_cli=False)
        except ConfigError as e:
            raise ConfigError(f"{config_file}: {e}") from e
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        _apply(cfg, "", _nest(overrides), from_cli=True)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def iter_fields(obj: Any, prefix: str = ""):
    """Yield (dotted_key, dataclass_field, value) for every leaf field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, value


def _check_range(key: str, value: Any, meta: dict) -> None:
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {list(meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} must be finite")
        bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
                  ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
        for name, sym, ok in bounds:
            b = meta.get(name)
            if b is not None and not ok(value, b):
                allowed = " and ".join(f"{s} {meta[n]}" for n, s, _ in bounds if meta.get(n) is not None)
                raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")


def absolute_local_path(url: str) -> str:
    """A relative local path made absolute, `~` expanded (other URLs and '' as they are): a run records where its
    data is, and `s3dist eval / export / embed` read that from any directory."""
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def validate(cfg: RunConfig) -> None:
    """Field ranges plus the cross-field rules that do not need a process group."""
    for key, f, value in iter_fields(cfg):
        _check_range(key, value, f.metadata)
    twice = sorted({m for m in cfg.data.modalities if cfg.data.modalities.count(m) > 1})
    if twice:
        raise ConfigError(f"config key 'data.modalities' names {twice} more than once; list each modality once")
    for s in cfg.stages.run:
        if s not in STAGE_NAMES:
            raise ConfigError(f"config key 'stages.run' names unknown stage {s!r}; allowed: {list(STAGE_NAMES)}")
    order = [STAGE_NAMES.index(s) for s in cfg.stages.run]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(f"config key 'stages.run' = {cfg.stages.run} must list stages once each, in the order "
                          f"{list(STAGE_NAMES)}")
    for p in cfg.eval.keep_fractions:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
            raise ConfigError(f"config key 'eval.keep_fractions' holds {p!r}; each must be in [0, 1]")
    if not cfg.stages.run:
        raise ConfigError(f"config key 'stages.run' is empty; give the stages to run, e.g. stages.run=[specialize] "
                          f"or {list(STAGE_NAMES)}")
    if not cfg.eval.probe_Cs:
        raise ConfigError("config key 'eval.probe_Cs' is empty; give at least one C > 0, e.g. eval.probe_Cs=[1.0]")
    for c in cfg.eval.probe_Cs:
        if not isinstance(c, (int, float)) or float(c) <= 0:
            raise ConfigError(f"config key 'eval.probe_Cs' holds {c!r}; each must be > 0")
    for d in cfg.data.synth.modality_dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise ConfigError(f"config key 'data.synth.modality_dims' holds {d!r}; each must be an int >= 1")
    if len(cfg.data.synth.modality_dims) < 1:
        raise ConfigError("config key 'data.synth.modality_dims' is empty; give at least one width")
    _validate_synth(cfg.data.synth)
    if cfg.moe.kind != "dense":
        n, k = cfg.moe.resolved_num_experts(), cfg.moe.resolved_top_k()
        if k > n:
            raise ConfigError(f"config key 'moe.top_k' resolves to k={k}, more than the {n} experts per modality; "
                              f"lower moe.top_k / moe.granularity or raise moe.num_experts")
    if cfg.model.arch == "transformer" and cfg.model.d_model % cfg.model.num_heads:
        raise ConfigError(f"config key 'model.num_heads' = {cfg.model.num_heads} must divide model.d_model = "
                          f"{cfg.model.d_model}")
    if (cfg.stages.compactness == "vmf" and cfg.stages.select_target == "concepts" and "select" in cfg.stages.run
            and cfg.stages.compact_weight > 0):
        raise ConfigError("config key 'stages.compactness' = 'vmf' needs class labels (class mean directions); "
                          "stages.select_target='concepts' gives multi-hot targets: use stages.select_target=label, "
                          "stages.compactness=entropy or stages.compact_weight=0")
    if cfg.dist.zero_stage == 3:
        raise ConfigError("config key 'dist.zero_stage' = 3 is not supported: DeepSpeed MoE works with ZeRO "
                          "stages 0, 1 and 2 only; use dist.zero_stage=2 to shard optimizer state and gradients")
    if cfg.moe.kind == "topk" and "select" in cfg.stages.run:
        raise ConfigError("moe.kind='topk' is the plain-MoE baseline and has no S3 router to tune: drop 'select' "
                          "and 'sparsify' from stages.run or use moe.kind='s3'")
    if cfg.moe.balance == "bias" and cfg.moe.kind != "s3":
        raise ConfigError(f"config key 'moe.balance' = 'bias' needs the S3 router, but moe.kind = {cfg.moe.kind!r} "
                          f"(DeepSpeed's TopKGate has no selection bias; a dense model has no routing): use "
                          f"moe.kind=s3 or moe.balance=aux_loss / none")
    if cfg.moe.kind == "dense" and ("select" in cfg.stages.run or "sparsify" in cfg.stages.run):
        raise ConfigError("moe.kind='dense' has no routers: set stages.run=[specialize] for the dense baseline")
    check_safe_name("name", cfg.name)


def _validate_synth(sy: SynthConfig) -> None:
    """Cross-field rules of the synthetic generators (ranges are checked from the field metadata)."""
    if sy.kind == "concepts":
        if sy.label_concepts > sy.num_concepts:
            raise ConfigError(f"config key 'data.synth.label_concepts' = {sy.label_concepts} exceeds "
                              f"data.synth.num_concepts = {sy.num_concepts}")
        return
    if len(sy.modality_dims) < 2:
        raise ConfigError(f"config key 'data.synth.modality_dims' = {sy.modality_dims} gives one modality; "
                          f"data.synth.kind=factors needs at least 2 (shared factors are what modalities have "
                          f"in common), e.g. data.synth.modality_dims=[24,16]")
    if sy.label_mode == "shared" and sy.shared_dim < 3:
        raise ConfigError(f"config key 'data.synth.shared_dim' = {sy.shared_dim} is too small for "
                          f"data.synth.label_mode=shared, whose label uses shared factors 0, 1, 2: set "
                          f"data.synth.shared_dim=3 or more")
    if sy.label_mode == "shared_unique" and sy.unique_dim < 1:
        raise ConfigError(f"config key 'data.synth.unique_dim' = {sy.unique_dim} leaves no unique factor for "
                          f"data.synth.label_mode=shared_unique, whose label uses unique factor 0 of the first "
                          f"two modalities: set data.synth.unique_dim=1 or more, or data.synth.label_mode=shared")


def check_safe_name(key: str, value: str) -> None:
    """Names that become path components: no separators, no '..', no control characters."""
    if (not value or value in (".", "..") or "/" in value or "\\" in value or ".." in value
            or any(ord(c) < 32 or ord(c) == 127 for c in value)):
        raise ConfigError(f"{key} = {value!r} is not a safe name: use letters, digits, spaces, '-', '_' or '.', "
                          f"with no '/', '\\', '..' or control characters")


def validate_world(cfg: RunConfig, world_size: int, num_modalities: int, has_concepts: bool = True) -> int:
    """Rules that need the world size and the data set (its modalities, whether it carries generating
    concepts). Returns the resolved ep_size."""
    if cfg.stages.select_target == "concepts" and "select" in cfg.stages.run and not has_concepts:
        raise ConfigError("config key 'stages.select_target' = 'concepts' needs a data set with generating "
                          "concepts (the synthetic one); this data set has none: use stages.select_target=label")
    ep = cfg.dist.ep_size or world_size
    given = f"{ep}" if cfg.dist.ep_size else f"0 (the world size, {ep})"
    if world_size % ep:
        raise ConfigError(f"config key 'dist.ep_size' = {given} must divide the world size {world_size}; "
                          f"choose one of {[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    if cfg.moe.kind != "dense":
        per, total = cfg.moe.resolved_num_experts(), cfg.moe.total_experts(num_modalities)
        if total % ep:
            fits = [d for d in range(1, world_size + 1) if world_size % d == 0 and total % d == 0]
            pools = "1 pool shared by the modalities" if total == per else f"{num_modalities} modalities"
            raise ConfigError(f"config key 'dist.ep_size' = {given} must divide the total number of experts "
                              f"{total} ({per} per pool x {pools}); on {world_size} ranks set "
                              f"dist.ep_size to one of {fits}, or change moe.num_experts")
    return ep


# --------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(doc: dict, prefix: str = "") -> dict:
    """{'moe': {'top_k': 2}} -> {'moe.top_k': 2}: dotted keys, as overrides name them."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


RUN_CONFIG_HEADER = "# s3dist run config: every key as this run resolved it (written by s3dist; do not edit)\n"


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """A run's resolved config, under a header that tells it apart from a recipe (`s3dist.rundir.holds_run`)."""
    Path(path).write_text(RUN_CONFIG_HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def from_dict(doc: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, "", doc, from_cli=False)
    validate(cfg)
    return cfg


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every field: the reference table in the README is made from this."""
    rows = []
    for f, typ in _field_types(cls).values():
        if dataclasses.is_dataclass(typ):
            rows.extend(describe(typ, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata["doc"]))
    return rows

