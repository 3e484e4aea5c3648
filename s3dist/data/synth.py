"""The synthetic concept-structured data set: multimodal sequences whose ground truth is known.

Mechanism (all randomness from `SynthConfig.seed`; the fixed parts come from their own generators so
that changing the number of samples does not change the mixing weights):

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
- **Lengths.** Each sample has a length L uniform in [ceil(T/2), T]; the signal occupies the last L steps,
  the first T - L steps are zeros with mask False (padding at the front, as in MultiBench).
- **Label.** 1 if any of the first `label_concepts` concepts is active, else 0.

Modalities are named text / audio / vision for the first three entries of `modality_dims`, then m3, m4,
... Rows are generated in one stream and cut into train / val / test in that order.
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
    """All rows of the data set as numpy arrays (features per modality, masks, concepts, labels)."""
    n, k, t = cfg.num_train + cfg.num_val + cfg.num_test, cfg.num_concepts, cfg.seq_len
    fixed_seq, sample_seq = np.random.SeedSequence(cfg.seed).spawn(2)
    fixed, rng = np.random.default_rng(fixed_seq), np.random.default_rng(sample_seq)

    z = rng.random((n, k)) < cfg.concept_rate
    none = ~z.any(1)
    z[np.flatnonzero(none), rng.integers(0, k, size=int(none.sum()))] = True
    lengths = rng.integers((t + 1) // 2, t + 1, size=n)
    pad = t - lengths                                            # leading padding steps
    rel = np.arange(t)[None, :] - pad[:, None]                   # time since the sequence started
    mask = rel >= 0
    rel = np.clip(rel, 0, t - 1)

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
    label = LabelSpec(kind="binary", num_classes=2,
                      binarize=f"1 if any of concepts 0..{cfg.label_concepts - 1} is active, else 0")
    source = (f"s3dist synthetic generator: K={cfg.num_concepts} concepts, rate={cfg.concept_rate}, "
              f"T={cfg.seq_len}, dims={list(cfg.modality_dims)}, nuisance_dim={cfg.nuisance_dim}, "
              f"nuisance_scale={cfg.nuisance_scale}, noise_std={cfg.noise_std}, seed={cfg.seed}")
    return write_dataset(out_url, name=name, splits=splits, label=label, source=source,
                         rows_per_shard=cfg.rows_per_shard, num_concepts=cfg.num_concepts, overwrite=overwrite)
