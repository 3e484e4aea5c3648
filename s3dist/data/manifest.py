"""The data-set manifest: `manifest.json` in a data set's folder, next to its Parquet shards.

It is the single description of a data set that everything else reads: which modalities exist and
their shapes, what the label means, which shard files make up each split, their row counts,
sha256 checksums and NaN / inf counts per modality. Parquet column layout (written by `s3dist.data.writer`):

- `id` int64, unique within the data set; `label` int64 class id; `label_raw` float64 (optional,
  the value before binarisation);
- per modality `<name>`: fixed-size list<float32> of length prod(shape) (row-major [T*D]);
- per sequence modality `<name>__mask`: fixed-size list<bool> of length T (True = real step;
  MultiBench pads at the front);
- synthetic data sets only: `concepts` fixed-size list<uint8> of length `num_concepts`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import fsspec

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, doc: dict, where: str = MANIFEST_FILE) -> Manifest:
        def need(d: dict, key: str, ctx: str):
            if not isinstance(d, dict) or key not in d:
                raise DataError(f"{where}: missing key '{ctx}{key}'; the manifest must be written by an "
                                f"s3dist importer (s3dist data import-... / synth)")
            return d[key]

        try:
            mods = {}
            for m, spec in need(doc, "modalities", "").items():
                shape = [int(s) for s in need(spec, "shape", f"modalities.{m}.")]
                seq = bool(spec.get("sequence", len(shape) == 2))
                if len(shape) != (2 if seq else 1) or min(shape) < 1:
                    raise DataError(f"{where}: modalities.{m}.shape = {shape} must be [T, D] for a sequence "
                                    f"or [D] otherwise, all >= 1")
                mods[m] = ModalitySpec(shape=shape, dtype=str(spec.get("dtype", "float32")), sequence=seq)
            lab = need(doc, "label", "")
            label = LabelSpec(kind=str(need(lab, "kind", "label.")), num_classes=int(need(lab, "num_classes", "label.")),
                              binarize=str(lab.get("binarize", "")))
            if label.kind not in LABEL_KINDS:
                raise DataError(f"{where}: label.kind = {label.kind!r}; allowed: {list(LABEL_KINDS)}")
            splits = {}
            for s, spec in need(doc, "splits", "").items():
                files = [str(f) for f in need(spec, "files", f"splits.{s}.")]
                splits[s] = SplitSpec(files=files, rows=int(need(spec, "rows", f"splits.{s}.")),
                                      checksums=dict(spec.get("checksums", {})),
                                      file_rows={k: int(v) for k, v in spec.get("file_rows", {}).items()},
                                      nonfinite=None if spec.get("nonfinite") is None else {
                                          f: {m: int(c) for m, c in counts.items()}
                                          for f, counts in spec["nonfinite"].items()})
            k = doc.get("num_concepts")
            return cls(name=str(need(doc, "name", "")), modalities=mods, label=label, splits=splits,
                       num_concepts=None if k is None else int(k), source=str(doc.get("source", "")))
        except (TypeError, ValueError, AttributeError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{where}: malformed manifest ({e}); re-create the data set with s3dist data ...") from e


def dataset_fs(url: str):
    """(filesystem, root path without protocol) of a data-set folder URL."""
    return fsspec.core.url_to_fs(url.rstrip("/") or url)


def read_manifest(url: str) -> Manifest:
    """Read `<url>/manifest.json` (url: any fsspec URL of the data-set folder)."""
    fs, root = dataset_fs(url)
    path = f"{root}/{MANIFEST_FILE}"
    where = f"{url.rstrip('/')}/{MANIFEST_FILE}"
    if not fs.exists(path):
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
