"""The data-set manifest: `manifest.json` in a data set's folder, next to its Parquet shards.

It is the single description of a data set that everything else reads: which modalities exist and
their shapes, what the label means, which shard files make up each split, their row counts,
sha256 checksums and NaN / inf counts per modality. Parquet column layout (written by `s3dist.data.writer`):

- `id` int64, unique within the data set; `label` int64 class id; `label_raw` float64 (optional,
  the value before binarisation);
- per modality `<name>`: fixed-size list<float32> of length prod(shape) (row-major [T*D]);
- per sequence modality `<name>__mask`: fixed-size list<bool> of length T (True = real step;
  MultiBench pads at the front);
- synthetic data sets only: `concepts` fixed-size list<uint8> of length `num_concepts`. For the factors
  kind these are the sign bits of the generating factors; the optional manifest fields `concept_groups`
  (group name -> concept indices, e.g. "shared", "unique:text", "nuisance:text") and `label_concepts`
  (the indices the label is built from) say which is which. Manifests without them still load.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np

from s3dist.data import DataError

MANIFEST_FILE = "manifest.json"
LABEL_KINDS = ("binary", "multiclass", "regression")


@dataclass
class ModalitySpec:
    shape: list[int]          # [T, D] for sequences, [D] otherwise
    dtype: str = "float32"
    sequence: bool = True

    @property
    def steps(self) -> int:
        return self.shape[0] if self.sequence else 1

    @property
    def width(self) -> int:
        return self.shape[-1]

    @property
    def flat_size(self) -> int:
        return math.prod(self.shape)


@dataclass
class LabelSpec:
    kind: str                 # binary / multiclass / regression
    num_classes: int
    binarize: str = ""        # how the stored class id was derived from the raw value


@dataclass
class SplitSpec:
    files: list[str]                                           # relative to the data-set folder
    rows: int
    checksums: dict[str, str] = field(default_factory=dict)   # file -> sha256 hex
    file_rows: dict[str, int] = field(default_factory=dict)   # file -> rows (per-rank batch counts)
    # file -> {modality: NaN/inf values}, files with none left out; None: not counted (a manifest from
    # s3dist <= 0.1, or written by hand). Counted when the shards are written, so the stream can stop
    # at open, before training, on data it would have to stop on later.
    nonfinite: dict[str, dict[str, int]] | None = None

    def nonfinite_totals(self) -> dict[str, int] | None:
        """NaN / inf values per modality over the split's shards (modalities with none left out);
        None when they were not counted."""
        if self.nonfinite is None:
            return None
        totals: dict[str, int] = {}
        for counts in self.nonfinite.values():
            for m, c in counts.items():
                totals[m] = totals.get(m, 0) + c
        return {m: c for m, c in totals.items() if c}


@dataclass
class Manifest:
    name: str
    modalities: dict[str, ModalitySpec]
    label: LabelSpec
    splits: dict[str, SplitSpec]
    num_concepts: int | None = None
    source: str = ""
    # Optional (None: absent, and then left out of manifest.json so older manifests read and write unchanged):
    # which stored concepts are which generating factors, and which of them the label is built from.
    concept_groups: dict[str, list[int]] | None = None
    label_concepts: list[int] | None = None

    def columns(self, modalities: list[str]) -> dict[str, tuple[np.dtype, int | None]]:
        """The Parquet columns of `modalities` (the layout above): name -> (numpy dtype, fixed list size, None
        for a scalar). The one description the stream's checks, its `datasets` features and its empty
        batches are built from."""
        cols: dict[str, tuple[np.dtype, int | None]] = {"id": (np.dtype(np.int64), None),
                                                         "label": (np.dtype(np.int64), None)}
        for name in modalities:
            spec = self.modalities[name]
            cols[name] = (np.dtype(np.float32), spec.flat_size)
            if spec.sequence:
                cols[f"{name}__mask"] = (np.dtype(bool), spec.steps)
        if self.num_concepts:
            cols["concepts"] = (np.dtype(np.uint8), self.num_concepts)
        return cols

    def to_json(self) -> str:
        doc = asdict(self)
        for key in _OPTIONAL_KEYS:
            if doc[key] is None:
                del doc[key]
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, doc: dict, where: str = MANIFEST_FILE) -> Manifest:
        def need(d: dict, key: str, ctx: str):
            if not isinstance(d, dict) or key not in d:
                raise DataError(f"{where}: missing key '{ctx}{key}'; the manifest must be written by an "
                                f"s3dist importer (s3dist data import-... / synth)")
            return d[key]

        at = ""  # the field being read, for the message of a malformed one
        try:
            mods = {}
            at = "modalities"
            for m, spec in need(doc, "modalities", "").items():
                at = f"modalities.{m}"
                shape = [int(s) for s in need(spec, "shape", f"modalities.{m}.")]
                seq = bool(spec.get("sequence", len(shape) == 2))
                if len(shape) != (2 if seq else 1) or min(shape) < 1:
                    raise DataError(f"{where}: modalities.{m}.shape = {shape} must be [T, D] for a sequence "
                                    f"or [D] otherwise, all >= 1")
                mods[m] = ModalitySpec(shape=shape, dtype=str(spec.get("dtype", "float32")), sequence=seq)
            at = "label"
            lab = need(doc, "label", "")
            label = LabelSpec(kind=str(need(lab, "kind", "label.")), num_classes=int(need(lab, "num_classes", "label.")),
                              binarize=str(lab.get("binarize", "")))
            if label.kind not in LABEL_KINDS:
                raise DataError(f"{where}: label.kind = {label.kind!r}; allowed: {list(LABEL_KINDS)}")
            splits = {}
            at = "splits"
            for s, spec in need(doc, "splits", "").items():
                at = f"splits.{s}"
                files = need(spec, "files", f"splits.{s}.")
                if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                    raise DataError(f"{where}: splits.{s}.files = {files!r} must be a list of shard file names; "
                                    f"re-create the data set with s3dist data ...")
                splits[s] = SplitSpec(files=files, rows=int(need(spec, "rows", f"splits.{s}.")),
                                      checksums=dict(spec.get("checksums", {})),
                                      file_rows={k: int(v) for k, v in spec.get("file_rows", {}).items()},
                                      nonfinite=None if spec.get("nonfinite") is None else {
                                          f: {m: int(c) for m, c in counts.items()}
                                          for f, counts in spec["nonfinite"].items()})
            at = "num_concepts"
            k = doc.get("num_concepts")
            k = None if k is None else int(k)
            groups, label_concepts = _concept_indices(doc, k, where)
            return cls(name=str(need(doc, "name", "")), modalities=mods, label=label, splits=splits,
                       num_concepts=k, source=str(doc.get("source", "")), concept_groups=groups,
                       label_concepts=label_concepts)
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: malformed manifest at '{at or 'the top level'}' ({type(e).__name__}: {e}); "
                            f"re-create the data set with s3dist data ...") from e


_OPTIONAL_KEYS = ("concept_groups", "label_concepts")


def _concept_indices(doc: dict, k: int | None, where: str) -> tuple[dict[str, list[int]] | None, list[int] | None]:
    """The optional `concept_groups` / `label_concepts`, checked against `num_concepts`."""
    def indices(value, key: str) -> list[int]:
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise DataError(f"{where}: {key} = {value!r} must be a list of concept indices")
        bad = [i for i in value if k is None or not 0 <= i < k]
        if bad:
            raise DataError(f"{where}: {key} holds {bad}, outside the {k or 0} concepts (num_concepts); "
                            f"re-create the data set with s3dist data synth")
        return list(value)

    groups = doc.get("concept_groups")
    if groups is not None:
        if not isinstance(groups, dict):
            raise DataError(f"{where}: concept_groups must map a group name to concept indices, got {groups!r}")
        groups = {str(g): indices(v, f"concept_groups.{g}") for g, v in groups.items()}
    label = doc.get("label_concepts")
    return groups, None if label is None else indices(label, "label_concepts")


def dataset_fs(url: str):
    """(filesystem, root path without protocol) of a data-set folder URL.

    An unknown protocol (a typo such as `fiel://`) or one whose fsspec backend is not installed (`s3://`
    without s3fs) is a DataError naming the URL, not an fsspec traceback from deep inside a rank."""
    try:
        return fsspec.core.url_to_fs(url.rstrip("/") or url)
    except ImportError as e:
        raise DataError(f"'{url}': {e} (fsspec needs that package for this protocol)") from e
    except ValueError as e:
        raise DataError(f"'{url}' is not a URL fsspec can open ({e}); use a local path or a protocol from "
                        f"fsspec.available_protocols()") from e


def read_manifest(url: str, recorded_by: str | None = None, new_place: str = "--data URL") -> Manifest:
    """Read `<url>/manifest.json` (url: any fsspec URL of the data-set folder). `recorded_by`: the run or export
    that recorded `url` as its data, when the command did not give it: a data set moved since is then named as
    such, with the option that points at its new place (`new_place`)."""
    fs, root = dataset_fs(url)
    path = f"{root}/{MANIFEST_FILE}"
    where = f"{url.rstrip('/')}/{MANIFEST_FILE}"
    if not fs.exists(path):  # one existence check: on an object store it is a request
        if recorded_by:
            raise DataError(f"{where} not found: {recorded_by} trained on the data set at '{url}', which is no "
                            f"longer there. If it has moved, pass its new place with {new_place}")
        raise DataError(f"{where} not found: '{url}' is not an s3dist data set. Create one with "
                        f"`s3dist data import-multibench`, `import-arrays` or `synth`")
    try:
        with fs.open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{where} cannot be read: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not valid JSON ({e}); re-create the data set") from e
    if not isinstance(doc, dict):
        raise DataError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    return Manifest.from_dict(doc, where)
