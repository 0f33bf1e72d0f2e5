"""The build spec: a YAML file naming each source, its layout, modality, task, labels, licence.

name: my-bank
split: {train: 0.8, val: 0.1, test: 0.1}
sources:
  - name: hc18
    layout: pairs                 # pairs | volumes | nnunet | msd | dicom
    root: data/hc18               # relative to the spec file
    image: images/{id}HC.png
    mask: masks/{id}HC_Annotation.png
    case: '^(\\d+)'
    modality: us
    task: fetal_head
    licence: CC-BY-4.0
  - name: liver-ct
    layout: dicom
    root: data/dicom_ct_seg_dcmqi
    items: [{id: case1, image: ct-3slice, seg: liver.dcm}]
    modality: ct
    task: liver
    licence: BSD-3-Clause
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

LAYOUTS = ("pairs", "volumes", "nnunet", "msd", "dicom")
MODALITIES = (
    "ct", "mr", "pet", "us", "xray", "endoscopy", "dermoscopy", "fundus", "pathology", "other",
)  # fmt: skip
INTENSITY_MODES = ("auto", "window", "zscore", "percentile", "as_is")


@dataclass
class IntensitySpec:
    """How a source's intensities become 8-bit images.

    auto: CT -> window, MR/PET -> percentile, everything else -> as_is.
    window: CT (level, width) in HU, default (40, 400).
    zscore: clip to `clip` (default (-1000, 1000) HU), z-score over the volume, store z in [-3, 3].
    percentile: clip at `percentiles` of the volume, scale to [0, 255].
    as_is: uint8 kept; other types min-max scaled.
    """

    mode: str = "auto"
    window: list[float] | None = None
    clip: list[float] | None = None
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])

    def __post_init__(self):
        if self.mode not in INTENSITY_MODES:
            raise ValueError(f"intensity.mode={self.mode!r}: choose one of {INTENSITY_MODES}")


@dataclass
class ItemSpec:
    """One case given explicitly: an image (file or DICOM series folder) and its labels: a label
    map (`mask`), a DICOM-SEG (`seg`) or an RTSTRUCT (`rtstruct`)."""

    image: str
    id: str | None = None
    mask: str | None = None
    seg: str | None = None
    rtstruct: str | None = None
    series_uid: str | None = None  # the series to read when `image` is a folder holding several


@dataclass
class SourceSpec:
    name: str
    layout: str
    root: str
    modality: str
    task: str
    licence: str
    image: str | None = None  # pattern with {id} (pairs, volumes)
    mask: str | None = None  # pattern with {id} (+ {label} for pairs)
    items: list[ItemSpec] = field(default_factory=list)  # explicit cases (volumes, dicom)
    case: str | None = None  # regex on the id; group 1 = case id
    labels: dict[int, str] = field(default_factory=dict)  # label id -> name (label maps)
    labels_json: str | None = None  # JSON file {id: name} (or {key: {id: name}} with labels_key)
    labels_key: str | None = None
    include: list[str] | None = None  # keep only these label names
    axis: int = 0  # slicing axis of volumes in (z, y, x): 0 axial, 1 coronal, 2 sagittal
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    empty_keep_fraction: float = (
        0.0  # of a label's empty slices inside its z-range, kept as negatives
    )
    min_area: int = 1  # masks with fewer foreground pixels count as empty
    spacing_csv: str | None = None  # pairs: CSV with file name + pixel size (mm)
    split: dict[str, float] | None = None  # this source's split fractions (default: the spec's)
    spacing: float | list[float] | None = None  # pairs: pixel size in mm, one value or [row, col]
    mask_threshold: int = 127  # pairs: a mask pixel above this (8-bit scale) is foreground
    mask_channel: int | None = None  # pairs: RGB masks whose channels differ: use this channel
    mask_colors: dict[str, list[int]] = field(default_factory=dict)  # pairs: label -> [r, g, b]
    fov: str | None = None  # pairs: field-of-view mask pattern with {id}; 0 outside = ignored
    case_from: str | None = None  # share case ids and splits with this (earlier) source
    split_by: str = "case"  # "case", or "slab": each volume cut into contiguous z slabs per split

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"source {self.name!r}: layout={self.layout!r}; choose one of {LAYOUTS}"
            )
        if self.modality not in MODALITIES:
            raise ValueError(
                f"source {self.name!r}: unknown modality {self.modality!r}; choose one of {MODALITIES}"
            )
        if self.axis not in (0, 1, 2):
            raise ValueError(f"source {self.name!r}: axis={self.axis}; use 0 (z), 1 (y) or 2 (x)")
        if self.layout in ("pairs",) and not (self.image and self.mask):
            raise ValueError(f"source {self.name!r}: layout pairs needs image and mask patterns")
        if self.layout == "volumes" and not (self.items or (self.image and self.mask)):
            raise ValueError(
                f"source {self.name!r}: layout volumes needs items or image/mask patterns"
            )
        if self.layout == "dicom" and not self.items:
            raise ValueError(
                f"source {self.name!r}: layout dicom needs items (image = series folder)"
            )
        if self.split_by not in ("case", "slab"):
            raise ValueError(
                f"source {self.name!r}: split_by={self.split_by!r}; use 'case' (whole cases) or "
                "'slab' (contiguous slabs of each volume, for a source of one or few volumes)"
            )
        if not 0 <= self.mask_threshold < 255:
            raise ValueError(f"source {self.name!r}: mask_threshold must be in [0, 254]")
        if self.mask_channel is not None and self.mask_channel not in (0, 1, 2):
            raise ValueError(f"source {self.name!r}: mask_channel must be 0 (R), 1 (G) or 2 (B)")
        if self.mask_channel is not None and self.mask_colors:
            raise ValueError(f"source {self.name!r}: give mask_channel or mask_colors, not both")
        for label, rgb in self.mask_colors.items():
            if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                raise ValueError(
                    f"source {self.name!r}: mask_colors[{label!r}]={rgb}; give [r, g, b] in 0..255"
                )
        sp = self.spacing if isinstance(self.spacing, list) else [self.spacing]
        if self.spacing is not None and not (len(sp) in (1, 2) and all(v and v > 0 for v in sp)):
            raise ValueError(
                f"source {self.name!r}: spacing={self.spacing}; give the pixel size in mm, one "
                "positive number or [row, col]"
            )
        if self.spacing is not None and self.spacing_csv:
            raise ValueError(f"source {self.name!r}: give spacing or spacing_csv, not both")
        if self.case_from == self.name:
            raise ValueError(f"source {self.name!r}: case_from names the source itself")
        if not 0.0 <= self.empty_keep_fraction <= 1.0:
            raise ValueError(f"source {self.name!r}: empty_keep_fraction must be in [0, 1]")


@dataclass
class BuildSpec:
    sources: list[SourceSpec]
    name: str = "medbank"
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    clip_radius: int = 2  # neighbours stored per sample: slices z-R..z+R
    max_size: int | None = None  # downscale slices whose longest side exceeds this (px)


def load_spec(path: str | Path) -> tuple[BuildSpec, str]:
    """Read and validate a spec; roots are resolved against the spec's folder.

    Returns (spec, sha256 of the file's bytes)."""
    import yaml

    from samed2_kit.config import from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec {path} does not exist")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"spec {path} is not valid YAML: {e}") from e
    spec = from_dict(BuildSpec, data, "", str(path))
    names = [s.name for s in spec.sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"spec {path}: source names must be unique; repeated: {sorted(dup)}")
    if not spec.sources:
        raise ValueError(f"spec {path}: sources is empty: list at least one source")
    for i, s in enumerate(spec.sources):
        if s.case_from and s.case_from not in names[:i]:
            raise ValueError(
                f"spec {path}: source {s.name!r} case_from={s.case_from!r}: name a source listed "
                f"before it ({names[:i] or 'none'})"
            )
    for s in spec.sources:
        root = Path(s.root).expanduser()
        s.root = str(root if root.is_absolute() else (path.parent / root).resolve())
    return spec, hashlib.sha256(raw).hexdigest()
