"""The synthetic data sets: multimodal sequences whose ground truth is known.

Two generators, chosen by `SynthConfig.kind`. In both, all randomness comes from `SynthConfig.seed`, and
the fixed parts (temporal patterns, mixing weights) come from their own generator, so that changing the
number of samples does not change them. Modalities are named text / audio / vision for the first three
entries of `modality_dims`, then m3, m4, ... Rows are generated in one stream and cut into train / val /
test in that order. Each sample has a length L uniform in [ceil(T/2), T]; the signal occupies the last L
steps, the first T - L steps are zeros with mask False (padding at the front, as in MultiBench).

## kind = "concepts" (the default): binary concepts seen by every modality

- **Concepts.** K = `num_concepts` latent binary concepts. Each sample activates each concept
  independently with probability `concept_rate`; a sample with none active gets one, chosen uniformly.
  The activations are stored in the `concepts` column.
- **Signatures.** Each concept k has, per modality m, a temporal signature sig[m, k] in R^{T x S}
  (S = 8): a sinusoid with its own random frequency (0.5-3 cycles per sequence) and phase along a random
  direction, plus a constant random offset direction. A sample's latent trajectory in modality m is the
  sum of the signatures of its active concepts, s_m(t) = sum_k z_k sig[m, k](t).
- **Mixing.** Modality m observes a fixed random nonlinear mix of that trajectory: a random 2-layer tanh
  network (S -> 2 D_m -> D_m, weights drawn once per modality), so each modality sees the same concepts
  through a different nonlinear lens. The mixed signal is scaled to unit standard deviation over the
  whole generated data set (one scalar per modality).
- **Nuisance.** Each sample draws, per modality, `nuisance_dim` private factors u_m ~ N(0, 1), independent
  across modalities, projected into the features by a fixed random matrix with unit-variance output and
  scaled by `nuisance_scale`; they are constant along the sequence. They carry no label information and
  are not shared between modalities, so cross-modal agreement can only come from the concepts.
- **Noise.** i.i.d. Gaussian observation noise with std `noise_std`.
- **Label.** 1 if any of the first `label_concepts` concepts is active, else 0.

Here every label-relevant concept is seen by every modality, so a cross-modal contrastive objective
loses nothing the label needs: this kind cannot separate S3 from a contrastive baseline.

## kind = "factors": shared, modality-unique and nuisance factors (after FactorCL's synthetic setting)

Why: by S3's theory (docs: S3_METHOD.md, "Why the method should help") a cross-modal contrastive
objective keeps only the information the modalities share, so it should lose label bits that live in
one modality only; and inputs carrying task-irrelevant information are where pruning routing paths can
help. This kind has both, with the ground truth stored. The mechanism is fixed in advance and not tuned
to favour any method; the defaults (4 shared, 4 unique and 4 nuisance factors per modality, noise std
0.3, nuisance as strong as the other factors) make each group equally large and equally visible.

- **Factors.** Per sample: shared factors s ~ N(0, I_S) (S = `shared_dim`), seen by every modality;
  per modality m, unique factors u_m ~ N(0, I_U) (U = `unique_dim`) and nuisance factors
  n_m ~ N(0, I_Q) (Q = `nuisance_dim`), independent of each other and across modalities.
- **Latent.** Modality m's latent is v_m = [s, u_m, `nuisance_scale` * n_m] (S + U + Q dimensions):
  nuisance goes through the same observation path as the other factors, only with its own amplitude.
- **Time.** Each latent dimension j of modality m has a fixed temporal pattern
  phi_mj(t) = sin(2 pi f_mj t / T + p_mj) (frequency f 0.5-3 cycles per sequence, phase p uniform,
  t counted from the sample's first real step), and z_m(t) = v_m * (1 + 0.5 phi_m(t)): the factor's
  amplitude is modulated by a factor in [0.5, 1.5] but its sign is visible at every step, so the
  factor is spread over the time axis rather than sitting in one step.
- **Mixing.** Modality m observes a fixed random 2-layer tanh network of z_m(t)
  ((S + U + Q) -> 2 D_m -> D_m, weights drawn once per modality from the fixed generator), scaled to
  unit standard deviation over the generated data set (one scalar per modality), plus i.i.d. Gaussian
  noise with std `noise_std`. Changing `nuisance_scale` keeps every weight; changing a dimension
  redraws them.
- **Label.** 8 classes from 3 sign bits, class = b0 + 2 b1 + 4 b2, never from nuisance.
  `label_mode=shared_unique`: b = [s_0 > 0, u_{first modality, 0} > 0, u_{second modality, 0} > 0], so
  two of the three bits are seen by one modality only. `label_mode=shared` (the control, same class
  count): b = [s_0 > 0, s_1 > 0, s_2 > 0], every bit seen by every modality.
- **Stored ground truth.** The `concepts` column holds the sign bits (factor > 0, before
  `nuisance_scale`) of every factor, in the order [s, u_0, u_1, ..., n_0, n_1, ...]; the manifest's
  `concept_groups` names the index range of each group ("shared", "unique:<modality>",
  "nuisance:<modality>"; empty groups are left out) and `label_concepts` the indices the label is
  built from. `factor_groups` below merges them into shared / unique / nuisance for evaluation.
"""

from __future__ import annotations

import numpy as np

from s3dist.config import SynthConfig
from s3dist.data.manifest import LabelSpec, Manifest
from s3dist.data.writer import SplitArrays, write_dataset

SIGNATURE_DIM = 8
_NAMES = ("text", "audio", "vision")


def modality_names(count: int) -> list[str]:
    return [(_NAMES[i] if i < len(_NAMES) else f"m{i}") for i in range(count)]


def _signatures(rng: np.random.Generator, k: int, t: int) -> np.ndarray:
    """[K, T, S] temporal signatures of one modality."""
    freq = rng.uniform(0.5, 3.0, size=(k, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(k, 1, 1))
    steps = np.arange(t)[None, :, None] / max(t, 1)
    wave = np.sin(2 * np.pi * freq * steps + phase)                               # [K, T, 1]
    direction = rng.normal(size=(k, 1, SIGNATURE_DIM)) / np.sqrt(SIGNATURE_DIM)
    offset = rng.normal(size=(k, 1, SIGNATURE_DIM)) / np.sqrt(SIGNATURE_DIM)
    return wave * direction + 0.5 * offset


def sample_arrays(cfg: SynthConfig) -> dict:
    """All rows of the data set as numpy arrays (features per modality, masks, concepts, labels; the factors
    kind adds `concept_groups` and `label_concepts`)."""
    return _sample_factors(cfg) if cfg.kind == "factors" else _sample_concepts(cfg)


def _lengths_mask(rng: np.random.Generator, n: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask [N, T], rel [N, T]): front padding of a length uniform in [ceil(T/2), T]; rel = steps since the
    sequence started, clipped to 0 on padding."""
    lengths = rng.integers((t + 1) // 2, t + 1, size=n)
    rel = np.arange(t)[None, :] - (t - lengths)[:, None]
    return rel >= 0, np.clip(rel, 0, t - 1)


def _sample_concepts(cfg: SynthConfig) -> dict:
    n, k, t = cfg.num_train + cfg.num_val + cfg.num_test, cfg.num_concepts, cfg.seq_len
    fixed_seq, sample_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    fixed, rng = np.random.default_rng(fixed_seq), np.random.default_rng(sample_seq)

    z = rng.random((n, k)) < cfg.concept_rate
    none = ~z.any(1)
    z[np.flatnonzero(none), rng.integers(0, k, size=int(none.sum()))] = True
    mask, rel = _lengths_mask(rng, n, t)

    features = {}
    for m, d in zip(modality_names(len(cfg.modality_dims)), cfg.modality_dims):
        sig = _signatures(fixed, k, t)                                           # [K, T, S]
        w1 = fixed.normal(size=(SIGNATURE_DIM, 2 * d)) / np.sqrt(SIGNATURE_DIM)
        b1 = fixed.normal(size=(2 * d,)) * 0.1
        w2 = fixed.normal(size=(2 * d, d)) / np.sqrt(2 * d)
        proj = fixed.normal(size=(max(cfg.nuisance_dim, 1), d)) / np.sqrt(max(cfg.nuisance_dim, 1))

        traj = np.einsum("nk,kts->nts", z.astype(np.float64), sig)               # [N, T, S]
        traj = np.take_along_axis(traj, rel[:, :, None], axis=1)                 # shift to the sample's start
        signal = np.tanh(traj @ w1 + b1) @ w2                                    # [N, T, D]
        signal /= signal[mask].std() + 1e-8
        x = signal
        if cfg.nuisance_dim > 0 and cfg.nuisance_scale > 0:
            u = rng.normal(size=(n, cfg.nuisance_dim))
            x = x + cfg.nuisance_scale * (u @ proj[: cfg.nuisance_dim])[:, None, :]
        x = x + cfg.noise_std * rng.normal(size=x.shape)
        x[~mask] = 0.0
        features[m] = x.astype(np.float32)
    labels = z[:, : cfg.label_concepts].any(1).astype(np.int64)
    return {"features": features, "mask": mask, "concepts": z.astype(np.uint8), "labels": labels}


def factor_layout(cfg: SynthConfig) -> tuple[dict[str, list[int]], list[int]]:
    """(concept_groups, label_concepts) of the factors kind: the index of each factor's sign bit in the
    `concepts` column, by group, and the indices the label is built from (in bit order)."""
    names = modality_names(len(cfg.modality_dims))
    groups: dict[str, list[int]] = {}
    start = 0
    for group, size in [("shared", cfg.shared_dim)] + [(f"unique:{m}", cfg.unique_dim) for m in names] \
            + [(f"nuisance:{m}", cfg.nuisance_dim) for m in names]:
        if size:
            groups[group] = list(range(start, start + size))
        start += size
    if cfg.label_mode == "shared":
        label = groups["shared"][:3]
    else:
        label = [groups["shared"][0], groups[f"unique:{names[0]}"][0], groups[f"unique:{names[1]}"][0]]
    return groups, label


def factor_groups(manifest: Manifest) -> dict[str, list[int]] | None:
    """Concept indices of a factors-kind data set merged by role: {"shared", "unique", "nuisance", "label"}
    (each a sorted list, possibly empty), e.g. to split a per-concept mutual information by role. None for
    a data set without `concept_groups` (the concepts kind, or not synthetic)."""
    if manifest.concept_groups is None:
        return None
    out: dict[str, list[int]] = {"shared": [], "unique": [], "nuisance": []}
    for group, idx in manifest.concept_groups.items():
        out.setdefault(group.split(":", 1)[0], []).extend(idx)
    out = {role: sorted(idx) for role, idx in out.items()}
    out["label"] = list(manifest.label_concepts or [])
    return out


def _temporal_mix(fixed: np.random.Generator, v: np.ndarray, rel: np.ndarray, t: int, d: int) -> np.ndarray:
    """[N, T, D] features of one modality from its latent v [N, L] (factors kind): fixed temporal amplitude
    patterns per latent dimension, then a fixed random 2-layer tanh network, scaled to unit std later."""
    latent = v.shape[1]
    freq = fixed.uniform(0.5, 3.0, size=latent)
    phase = fixed.uniform(0, 2 * np.pi, size=latent)
    w1 = fixed.normal(size=(latent, 2 * d)) / np.sqrt(latent)
    b1 = fixed.normal(size=(2 * d,)) * 0.1
    w2 = fixed.normal(size=(2 * d, d)) / np.sqrt(2 * d)
    phi = np.sin(2 * np.pi * freq * (rel[:, :, None] / max(t, 1)) + phase)        # [N, T, L]
    z = v[:, None, :] * (1.0 + 0.5 * phi)
    return np.tanh(z @ w1 + b1) @ w2


def _sample_factors(cfg: SynthConfig) -> dict:
    n, t = cfg.num_train + cfg.num_val + cfg.num_test, cfg.seq_len
    names = modality_names(len(cfg.modality_dims))
    fixed_seq, sample_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    fixed, rng = np.random.default_rng(fixed_seq), np.random.default_rng(sample_seq)

    shared = rng.normal(size=(n, cfg.shared_dim))
    unique = [rng.normal(size=(n, cfg.unique_dim)) for _ in names]
    nuisance = [rng.normal(size=(n, cfg.nuisance_dim)) for _ in names]
    mask, rel = _lengths_mask(rng, n, t)

    features = {}
    for i, (m, d) in enumerate(zip(names, cfg.modality_dims)):
        v = np.concatenate([shared, unique[i], cfg.nuisance_scale * nuisance[i]], axis=1)
        signal = _temporal_mix(fixed, v, rel, t, d)
        signal /= signal[mask].std() + 1e-8
        x = signal + cfg.noise_std * rng.normal(size=signal.shape)
        x[~mask] = 0.0
        features[m] = x.astype(np.float32)

    concepts = (np.concatenate([shared, *unique, *nuisance], axis=1) > 0).astype(np.uint8)
    groups, label_concepts = factor_layout(cfg)
    labels = (concepts[:, label_concepts].astype(np.int64) << np.arange(3)).sum(1)
    return {"features": features, "mask": mask, "concepts": concepts, "labels": labels,
            "concept_groups": groups, "label_concepts": label_concepts}


def _label_and_source(cfg: SynthConfig, data: dict) -> tuple[LabelSpec, str]:
    if cfg.kind == "factors":
        names = {i: g for g, idx in data["concept_groups"].items() for i in idx}
        bits = ", ".join(f"{names[i]}[{data['concept_groups'][names[i]].index(i)}] > 0"
                         for i in data["label_concepts"])
        label = LabelSpec(kind="multiclass", num_classes=8,
                          binarize=f"class = sum_i 2^i b_i over the sign bits b = [{bits}] "
                                   f"(concepts {data['label_concepts']})")
        source = (f"s3dist synthetic generator, kind=factors: shared_dim={cfg.shared_dim}, "
                  f"unique_dim={cfg.unique_dim}, nuisance_dim={cfg.nuisance_dim}, "
                  f"nuisance_scale={cfg.nuisance_scale}, label_mode={cfg.label_mode}, T={cfg.seq_len}, "
                  f"dims={list(cfg.modality_dims)}, noise_std={cfg.noise_std}, seed={cfg.seed}")
        return label, source
    label = LabelSpec(kind="binary", num_classes=2,
                      binarize=f"1 if any of concepts 0..{cfg.label_concepts - 1} is active, else 0")
    source = (f"s3dist synthetic generator: K={cfg.num_concepts} concepts, rate={cfg.concept_rate}, "
              f"T={cfg.seq_len}, dims={list(cfg.modality_dims)}, nuisance_dim={cfg.nuisance_dim}, "
              f"nuisance_scale={cfg.nuisance_scale}, noise_std={cfg.noise_std}, seed={cfg.seed}")
    return label, source


def generate(out_url: str, cfg: SynthConfig, name: str = "synth", *, overwrite: bool = False) -> Manifest:
    """Generate the data set described by `cfg` at `out_url` (atomically) and return its manifest."""
    data = sample_arrays(cfg)
    bounds = {"train": (0, cfg.num_train), "val": (cfg.num_train, cfg.num_train + cfg.num_val),
              "test": (cfg.num_train + cfg.num_val, cfg.num_train + cfg.num_val + cfg.num_test)}
    splits = {}
    for s, (a, b) in bounds.items():
        splits[s] = SplitArrays(features={m: x[a:b] for m, x in data["features"].items()}, labels=data["labels"][a:b],
                                masks={m: data["mask"][a:b] for m in data["features"]},
                                ids=np.arange(a, b), concepts=data["concepts"][a:b])
    label, source = _label_and_source(cfg, data)
    return write_dataset(out_url, name=name, splits=splits, label=label, source=source,
                         rows_per_shard=cfg.rows_per_shard, num_concepts=data["concepts"].shape[1],
                         concept_groups=data.get("concept_groups"), label_concepts=data.get("label_concepts"),
                         overwrite=overwrite)
