"""A trained S3 encoder outside its training job: Hugging Face-style folders, loading, embeddings.

`S3Encoder` is the training encoder (`s3dist.model.encoder.S3Encoder`) plus huggingface_hub's
`PyTorchModelHubMixin`. `save_pretrained(dir)` writes

    config.json         modalities and input widths, the run config, Stage-3 settings and calibrated
                        thresholds, where the data came from, the run's evaluation figures, s3dist version
    model.safetensors   every weight, experts named by their global index
    README.md           a model card generated from the above

and `S3Encoder.from_pretrained(path)` rebuilds it from such a folder, from a run directory (its newest
checkpoint), from a single-file `.safetensors` export or from a Hub repository id.

No process group is needed, and the numbers are the distributed encoder's: the encoder is built with
ep_size=1, so every expert lives in this process and DeepSpeed's `MOELayer` skips its all-to-all pair
(it runs it only for ep_size > 1); the S3 router agrees its capacity over an expert-parallel group only
when one is attached, and in evaluation mode sizes it to the demand, so no token is dropped on either
side. Stage 3 uses the thresholds calibrated on the training split (`s3dist.sparsify.FixedSparsifier`),
so a sample's embedding depends only on the sample.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin

import s3dist
from s3dist.config import ConfigError, from_dict, to_dict
from s3dist.model import encoder
from s3dist.sparsify import FixedSparsifier, decode_threshold, encode_threshold, pruned_layers, stage3_record

FUSED = "fused"  # key of the concatenated embedding in `embed`'s result


def shareable(path: Path) -> None:
    """Give `path` the permissions the umask allows a new file. safetensors writes its files owner-only
    (0600); an encoder is saved to be shared (a group's model folder, a copy to another account)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _hub_id_shaped(name: str) -> bool:
    """Whether `name` could be a Hub repository id ('name' or 'namespace/name'), not only a local path."""
    return name.count("/") <= 1 and not name.startswith(("/", ".", "~")) and not name.endswith(".safetensors")


class S3Encoder(encoder.S3Encoder, PyTorchModelHubMixin, library_name="s3dist", pipeline_tag="feature-extraction",
                tags=["s3dist", "multimodal", "mixture-of-experts", "deepspeed-moe"]):
    """A trained S3 encoder for one process (CPU or one GPU); see the module docstring.

    The constructor arguments are what `config.json` holds; build one with `from_pretrained`.
    """

    def __init__(self, modalities: list[str], input_dims: dict[str, int], run_config: dict,
                 stage3: dict | None = None, data: dict | None = None, evaluation: dict | None = None,
                 checkpoint: dict | None = None, s3dist_version: str = s3dist.__version__) -> None:
        cfg = from_dict(run_config)
        if FUSED in modalities:
            raise ConfigError(f"a modality is named '{FUSED}', the name of the fused embedding; rename it")
        missing = [m for m in modalities if m not in input_dims]
        if missing:
            raise ConfigError(f"input_dims has no width for modalities {missing}")
        super().__init__({m: int(input_dims[m]) for m in modalities}, cfg.model, cfg.moe, ep_size=1, ep_rank=0)
        self.run_config = cfg
        # config.json is written with sorted keys: the modality order (the fused embedding's) is the list's
        self.input_dims = {m: int(input_dims[m]) for m in modalities}
        self.stage3 = stage3 if stage3 is not None else stage3_record(cfg.stages, len(self.layers))
        self.data_info = data or {}
        self.evaluation = evaluation or {}
        self.checkpoint_info = checkpoint or {}
        self.s3dist_version = s3dist_version
        self.eval()

    # ------------------------------------------------------------------------------------------
    # Loading and saving
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> S3Encoder:
        """From an exported folder (`s3dist export`, `save_pretrained`), a run directory (newest checkpoint),
        a single `.safetensors` export or a Hub repository id. `map_location` picks the device (default cpu)."""
        path = Path(pretrained_model_name_or_path)
        device = kwargs.get("map_location", "cpu")
        if not path.exists() and not _hub_id_shaped(str(pretrained_model_name_or_path)):
            raise FileNotFoundError(f"'{path}' does not exist: give an s3dist export (its folder or .safetensors "
                                    f"file), a run directory, or a Hub repository id 'namespace/name'")
        if path.is_file() and path.suffix == ".safetensors":
            return cls.from_export_file(path).to(device)
        if path.is_dir() and not (path / "config.json").exists():
            if (path / "checkpoints").is_dir():
                return cls.from_run(path).to(device)
            raise FileNotFoundError(f"'{path}' is neither an s3dist export (config.json + model.safetensors, from "
                                    f"`s3dist export --run RUN --out DIR`) nor a run directory (checkpoints/)")
        if path.is_dir():  # the mixin would fail on a damaged config.json with a bare JSONDecodeError
            from s3dist.checkpoint import CheckpointError

            try:
                json.loads((path / "config.json").read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"'{path / 'config.json'}' is not valid JSON ({e}); export the run again "
                                      f"(s3dist export --run RUN --out {path})") from e
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs) -> S3Encoder:
        # The mixin's own loader defaults to strict=False, which would leave missing experts at their
        # random initialisation without a word.
        from huggingface_hub import constants, hf_hub_download
        from safetensors.torch import load_model

        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
        else:
            weights = hf_hub_download(repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        load_model(model, weights, strict=strict, device=map_location)
        return model.eval()

    @classmethod
    def from_run(cls, run_dir: Path) -> S3Encoder:
        """The newest complete checkpoint of a run, with its Stage-3 thresholds from `eval.json` when that
        evaluation was made from this checkpoint."""
        from s3dist import checkpoint as ckpt_io

        run_dir = Path(run_dir)
        ck = ckpt_io.find_latest(run_dir)
        if ck is None:
            raise ckpt_io.CheckpointError(f"no complete checkpoint under '{run_dir / 'checkpoints'}'; train first")
        meta = ckpt_io.read_meta(ck)
        state = ckpt_io.consolidated_state_dict(ck)
        cfg = from_dict(meta["config"])
        evaluation = _run_evaluation(run_dir, ck, meta["state"]["global_step"])
        stage3 = stage3_record(cfg.stages, cfg.model.num_layers)
        if evaluation.get("stage3"):
            stage3 = evaluation.pop("stage3")  # the settings its thresholds were calibrated with
        return _with_weights(cls, meta["config"], state, stage3=stage3, data=_data_info(cfg, run_dir),
                             evaluation=evaluation,
                             checkpoint={"tag": ck.name, **{k: meta["state"][k] for k in ("stage", "global_step")},
                                         "world_size": meta.get("world_size")},
                             s3dist_version=meta.get("version", s3dist.__version__))

    @classmethod
    def from_export_file(cls, path: Path) -> S3Encoder:
        """A single-file export (`s3dist export --out model.safetensors`): weights and run config only."""
        from s3dist.export import load_export

        cfg_dict, state = load_export(Path(path))
        return _with_weights(cls, cfg_dict, state, data=_data_info(from_dict(cfg_dict), None))

    def hub_config(self) -> dict:
        """What `config.json` holds: the constructor's arguments, from the encoder's current state (so
        thresholds added by `calibrate` are saved)."""
        return {"modalities": list(self.modalities), "input_dims": dict(self.input_dims),
                "run_config": to_dict(self.run_config), "stage3": self.stage3, "data": self.data_info,
                "evaluation": self.evaluation, "checkpoint": self.checkpoint_info,
                "s3dist_version": self.s3dist_version}

    def save_pretrained(self, save_directory: str | Path, **kwargs):
        kwargs.setdefault("config", self.hub_config())
        out = super().save_pretrained(save_directory, **kwargs)
        for f in Path(save_directory).iterdir():
            if f.is_file():
                shareable(f)
        return out

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        card_data = self._hub_mixin_info.model_card_data
        return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{model_card_text(self.hub_config())}")

    # ------------------------------------------------------------------------------------------
    # Embeddings
    # ------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def embed(self, features: dict, masks: dict | None = None, keep_fraction: float = 1.0) -> dict[str, torch.Tensor]:
        """Representations of a batch: {modality: [B, d], 'fused': [B, M*d]} (float32, on the encoder's
        device; 'fused' concatenates the modalities in `self.modalities` order, as evaluation does).

        features[m]: [B, T, D_m] or [B, D_m] (tensor or numpy array); masks[m]: bool [B, T], True = real
        step (None: every step is real). keep_fraction < 1 applies Stage 3 with the thresholds calibrated
        for that p on the training split (`self.calibrated_keep_fractions()`; `calibrate` adds others)."""
        feats, msks = self._inputs(features, masks)
        sparsifier = self.sparsifier(keep_fraction)
        training = self.training
        self.eval()
        try:
            out = self(feats, msks, sparsifier=sparsifier)
        finally:
            self.train(training)
        emb = {m: out.embeddings[m].float() for m in self.modalities}
        emb[FUSED] = torch.cat([emb[m] for m in self.modalities], dim=1)
        return emb

    def calibrated_keep_fractions(self) -> list[float]:
        return sorted(float(p) for p in (self.stage3.get("thresholds") or {}))

    def sparsifier(self, keep_fraction: float) -> FixedSparsifier | None:
        """Stage 3 for keep fraction p: None at p >= 1, else the calibrated thresholds for p."""
        p = float(keep_fraction)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"keep_fraction = {p} is outside [0, 1]")
        if p >= 1.0:
            return None
        if self.run_config.moe.kind != "s3":
            raise ValueError(f"keep_fraction = {p} needs the S3 router; this encoder has moe.kind="
                             f"'{self.run_config.moe.kind}' (nothing to sparsify)")
        table = self.stage3.get("thresholds") or {}
        key = next((k for k in table if math.isclose(float(k), p, abs_tol=1e-9)), None)
        if key is None:
            have = self.calibrated_keep_fractions()
            raise ValueError(
                f"no calibrated Stage-3 thresholds for keep_fraction = {p} (this encoder has them for "
                f"{have or 'no p'}). They are fixed on the training split: call encoder.calibrate(DATA_URL, {p}), "
                f"or evaluate the run at that p (`s3dist sweep --run RUN --keep-fractions {p},1.0`, which records "
                f"them in RUN/eval.json) and export it again")
        thresholds = {int(layer): {m: decode_threshold(t) for m, t in per.items()} for layer, per in table[key].items()}
        return FixedSparsifier(thresholds, self.stage3["prune_unit"], bool(self.stage3.get("prune_renormalize")))

    @torch.no_grad()
    def calibrate(self, data_url: str, keep_fraction: float, batch_size: int = 256) -> dict:
        """Fix Stage-3 thresholds for keep fraction p on the data set's training split (as evaluation does)
        and keep them: `embed(..., keep_fraction=p)` uses them and `save_pretrained` writes them."""
        from s3dist.data.stream import evaluation_stream
        from s3dist.sparsify import calibrate

        if not 0.0 < float(keep_fraction) < 1.0:  # before any data is read; 1 keeps every path and needs none
            raise ValueError(f"keep_fraction = {keep_fraction} must be in (0, 1): the fraction of routing paths "
                             f"Stage 3 keeps (1 keeps all and needs no thresholds)")
        stream = evaluation_stream(data_url, "train", self.run_config.data, self.run_config.seed,
                                   batch_size=batch_size, modalities=list(self.modalities))
        self.check_manifest(stream.manifest, data_url)
        st = self.stage3
        layers = set(st.get("pruned_layer_indices") or pruned_layers(len(self.layers), st["prune_layers"]))
        fixed = calibrate(self, stream, float(keep_fraction), st["prune_unit"], layers, self.device,
                          bool(st.get("prune_renormalize")))
        self.eval()
        st.setdefault("thresholds", {})[str(float(keep_fraction))] = {
            str(layer): {m: encode_threshold(t) for m, t in per.items()} for layer, per in fixed.items()}
        return fixed

    def _inputs(self, features: dict, masks: dict | None):
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(f"features lack modalities {missing}; this encoder needs {list(self.modalities)}")
        feats, msks, sizes = {}, {}, set()
        for m in self.modalities:
            x = torch.as_tensor(features[m], dtype=torch.float32, device=self.device)
            if x.dim() not in (2, 3) or x.shape[-1] != self.input_dims[m]:
                raise ValueError(f"features['{m}'] has shape {tuple(x.shape)}; expected [B, T, {self.input_dims[m]}] "
                                 f"or [B, {self.input_dims[m]}]")
            if x.dim() == 2:
                x = x.unsqueeze(1)  # a vector modality is one step
            if masks is not None and masks.get(m) is not None:
                k = torch.as_tensor(masks[m], device=self.device).bool()
                if k.dim() == 1:
                    k = k.unsqueeze(1)
                if tuple(k.shape) != tuple(x.shape[:2]):
                    raise ValueError(f"masks['{m}'] has shape {tuple(k.shape)}; expected {tuple(x.shape[:2])}")
            else:
                k = torch.ones(x.shape[:2], dtype=torch.bool, device=self.device)
            feats[m], msks[m] = x, k
            sizes.add(x.shape[0])
        if len(sizes) > 1:
            raise ValueError(f"modalities have different batch sizes {sorted(sizes)}")
        return feats, msks

    # ------------------------------------------------------------------------------------------
    # Data
    # ------------------------------------------------------------------------------------------

    def data_url(self, data: str | None = None, what: str = "this encoder") -> str:
        """The data set to use: `data` if given, else the one the run trained on, if it can be found.
        Raises ConfigError saying which `--data` is needed otherwise."""
        if data:
            return data
        info = self.data_info
        if info.get("url"):
            return info["url"]
        run_dir = info.get("run_dir")
        if run_dir and (Path(run_dir) / "data" / "manifest.json").exists():
            return str(Path(run_dir) / "data")
        where = f"the run directory it came from ('{run_dir}') no longer holds it" if run_dir else \
            "the export does not say which run it came from"
        raise ConfigError(f"{what} was trained on the embedded synthetic data set, which is not part of an export, "
                          f"and {where}: pass --data {run_dir or 'RUN_DIR'}/data, or regenerate the same data set "
                          f"(the generator is seeded) with `{_synth_command(self.run_config)}` and pass --data DIR")

    def check_manifest(self, manifest, url: str) -> None:
        """The data set has this encoder's modalities at its input widths."""
        from s3dist.data import DataError

        for m in self.modalities:
            spec = manifest.modalities.get(m)
            if spec is None:
                raise DataError(f"{url}: the data set has no modality '{m}' (it has {sorted(manifest.modalities)}); "
                                f"the encoder needs {list(self.modalities)}")
            if spec.width != self.input_dims[m]:
                raise DataError(f"{url}: modality '{m}' has width {spec.width} but the encoder was trained on width "
                                f"{self.input_dims[m]}; use the data set it was trained on (or one of that shape)")


# ---------------------------------------------------------------------------------------------
# Building from a run
# ---------------------------------------------------------------------------------------------


def _with_weights(cls, cfg_dict: dict, state: dict[str, torch.Tensor], **fields) -> S3Encoder:
    """An encoder built from a run config and weights; modality widths are read off the input projections."""
    from s3dist.checkpoint import CheckpointError

    cfg = from_dict(cfg_dict)
    mods = list(cfg.data.modalities)
    if not mods:
        raise CheckpointError("the saved config has no data.modalities; the run did not record its modalities")
    dims = {}
    for m in mods:
        w = state.get(f"inputs.{m}.proj.weight")
        if w is None:
            raise CheckpointError(f"the weights have no input projection for modality '{m}' (inputs.{m}.proj.weight)")
        dims[m] = int(w.shape[1])
    model = cls(mods, dims, cfg_dict, **fields)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model built from the saved config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()


def _run_evaluation(run_dir: Path, ckpt: Path, global_step: int) -> dict:
    """The run's eval.json if it evaluated this checkpoint: written at the end of training (same step), or
    by `s3dist eval/sweep --run` (step 0) after the checkpoint was published. {} otherwise."""
    from s3dist.checkpoint import META

    f = run_dir / "eval.json"
    if not f.exists():
        return {}
    res = json.loads(f.read_text())
    same_step = res.get("step") == global_step
    later_cli_eval = res.get("step") == 0 and f.stat().st_mtime >= (ckpt / META).stat().st_mtime
    if not (same_step or later_cli_eval):
        return {}
    keep = ("probe_accuracy", "sweep", "best_keep_fraction", "best_accuracy", "run_keep_fraction",
            "run_keep_fraction_accuracy", "eval_dropped_fraction", "stage3", "step")
    return {k: res[k] for k in keep if k in res}


def _data_info(cfg, run_dir: Path | None) -> dict:
    """Where the training data came from, and what the data set looks like (when it can be read)."""
    from s3dist.data import DataError
    from s3dist.data.manifest import read_manifest

    info: dict = {"url": cfg.data.path, "embedded_synthetic": not cfg.data.path,
                  "run_dir": str(Path(run_dir).resolve()) if run_dir else None}
    url = cfg.data.path or (str(Path(run_dir) / "data") if run_dir else None)
    if url:
        try:
            man = read_manifest(url)
        except (DataError, OSError):
            return info
        info.update(name=man.name, source=man.source, label={"kind": man.label.kind, "num_classes": man.label.num_classes},
                    shapes={m: list(s.shape) for m, s in man.modalities.items()},
                    rows={s: sp.rows for s, sp in man.splits.items()})
    return info


def _synth_command(cfg) -> str:
    from s3dist.config import SynthConfig

    default, synth = to_dict(SynthConfig()), to_dict(cfg.data.synth)
    fmt = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
    keys = " ".join(f"{k}={fmt(v)}" for k, v in synth.items() if v != default[k])
    return f"s3dist data synth --out DIR {keys}".rstrip()


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def model_card_text(conf: dict) -> str:
    """The README.md of an exported encoder: what it is, what it was trained on, how well it did."""
    rc, data, ev, st3, ck = conf["run_config"], conf["data"], conf["evaluation"], conf["stage3"], conf["checkpoint"]
    model, moe, stages = rc["model"], rc["moe"], rc["stages"]
    n = moe["num_experts"] or moe["granularity"] * moe["expansion"]
    k = moe["top_k"] or moe["granularity"]
    mods = ", ".join(f"`{m}` (width {conf['input_dims'][m]})" for m in conf["modalities"])
    if data.get("url"):
        source = f"`{data['url']}`"
    else:
        source = (f"the embedded synthetic data set (`data/` of run `{data.get('run_dir')}`; regenerate with "
                  f"`{_synth_command(from_dict(rc))}`)")
    lines = [
        "# S3 multimodal Mixture-of-Experts encoder",
        "",
        "Trained with s3dist (S3: Specialization, Selection, Sparsification; expert-parallel on DeepSpeed MoE). "
        "Load it in any Python process, without a process group:",
        "",
        "```python",
        "from s3dist import S3Encoder",
        "",
        "enc = S3Encoder.from_pretrained(\"THIS_FOLDER\")",
        "out = enc.embed({" + ", ".join(f"\"{m}\": x_{m}" for m in conf["modalities"]) + "})  # x: [B, T, D] or [B, D]",
        "out[\"fused\"]  # [B, M*d]; out[modality]: [B, d]",
        "```",
        "",
        "## Model",
        "",
        f"- modalities: {mods}",
        f"- encoder: `{model['arch']}`, d_model {model['d_model']}, {model['num_layers']} blocks, representation "
        f"`{model['representation']}`, tokens `{model['tokens']}`",
        f"- MoE: `{moe['kind']}`, {n} experts per modality, top-{k}, expert width {moe['expert_hidden']}",
        f"- checkpoint: `{ck.get('tag', '?')}` (global step {ck.get('global_step', '?')}), s3dist "
        f"{conf['s3dist_version']}",
        "",
        "## Training data",
        "",
        f"- data set: {data.get('name', '?')} from {source}",
    ]
    if data.get("label"):
        lines.append(f"- label: {data['label']['kind']}, {data['label']['num_classes']} classes")
    if data.get("rows"):
        lines.append("- rows: " + ", ".join(f"{s} {r}" for s, r in data["rows"].items()))
    lines += ["- stages: " + ", ".join(stages["run"]) + f" (Stage 1: {stages['specialize_steps']} steps, Stage 2: "
              f"{stages['select_steps']} steps)",
              f"- Stage 3: unit `{st3.get('prune_unit')}`, layers `{st3.get('prune_layers')}`, threshold "
              f"`{st3.get('prune_threshold')}`; calibrated thresholds for p in "
              f"{sorted(float(p) for p in (st3.get('thresholds') or {})) or 'none'}",
              "", "## Evaluation", ""]
    if ev:
        lines += ["Linear probe (logistic regression, C chosen on validation) on the frozen representations, test "
                  "split:", "", "| keep fraction p | test accuracy | val accuracy |", "|---|---|---|"]
        lines += [f"| {r['keep_fraction']:g} | {r['accuracy']:.4f} | {r['val_accuracy']:.4f} |" for r in ev["sweep"]]
        lines += ["", f"Probe accuracy at p = 1: {ev['probe_accuracy']:.4f}; best p on validation: "
                  f"{ev['best_keep_fraction']:g} (test {ev['best_accuracy']:.4f})."]
    else:
        lines.append("Not evaluated at export time (no eval.json for this checkpoint in the run directory).")
    return "\n".join(lines) + "\n"
