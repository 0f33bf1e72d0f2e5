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
    """One source of a spec; every key is documented in docs/data.md ("Source keys").

    Pairs-only keys (2D image/mask files): `spacing`, `spacing_csv`, `mask_threshold`,
    `mask_channel`, `mask_colors`, `fov`. Patterns are relative to `root`; `{id}` is the image id,
    matched case-sensitively, while the file-name extension matches in any case (`{id}.jpg`
    finds `a.JPG`).
    """

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
    # pairs: CSV (relative to root), comma-separated with a header row: a file-name column
    # (header with "file", "name" or "image") and a pixel-size column in mm (header with "pixel"
    # or "spacing"), isotropic; rows match the image's file name (folder dropped, extension in
    # any case or left out). An image without a row is skipped with that reason.
    spacing_csv: str | None = None
    split: dict[str, float] | None = None  # this source's split fractions (default: the spec's)
    spacing: float | list[float] | None = None  # pairs: pixel size in mm, one value or [row, col]
    # pairs: a mask pixel above this (8-bit scale) is foreground; 16-bit masks whose maximum
    # exceeds 255 compare with threshold * 257; masks whose maximum is <= 1 take every value > 0
    mask_threshold: int = 127
    mask_channel: int | None = None  # pairs: RGB masks whose channels differ: use this channel
    # pairs: colour-coded masks: label name -> [r, g, b] (8-bit); one sample per listed colour;
    # a colour named "background" is background; the mask pattern then takes no {label}
    mask_colors: dict[str, list[int]] = field(default_factory=dict)
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
            raise ValueError(
                f"source {self.name!r}: mask_threshold={self.mask_threshold}; give 0..254 on the "
                "8-bit scale (a mask pixel above it is foreground; 0: every non-zero pixel)"
            )
        if self.mask_channel is not None and self.mask_channel not in (0, 1, 2):
            raise ValueError(
                f"source {self.name!r}: mask_channel={self.mask_channel}; use 0 (R), 1 (G) or 2 (B)"
            )
        if self.mask_channel is not None and self.mask_colors:
            raise ValueError(f"source {self.name!r}: give mask_channel or mask_colors, not both")
        for label, rgb in self.mask_colors.items():
            if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
                raise ValueError(
                    f"source {self.name!r}: mask_colors[{label!r}]={rgb}; give [r, g, b] in 0..255"
                )
        colours = [tuple(rgb) for rgb in self.mask_colors.values()]
        if len(set(colours)) != len(colours):
            raise ValueError(
                f"source {self.name!r}: mask_colors {self.mask_colors} gives one colour to two "
                "labels; give each label its own [r, g, b]"
            )
        if self.mask_colors and set(self.mask_colors) <= {"background"}:
            raise ValueError(
                f"source {self.name!r}: mask_colors lists only background; add the labels' "
                "colours, e.g. {vessel: [255, 0, 0]}"
            )
        sp = self.spacing if isinstance(self.spacing, list) else [self.spacing]
        if self.spacing is not None and not (len(sp) in (1, 2) and all(_positive(v) for v in sp)):
            raise ValueError(
                f"source {self.name!r}: spacing={self.spacing}; give the pixel size in mm, one "
                "positive number or [row, col]"
            )
        if self.spacing is not None and self.spacing_csv:
            raise ValueError(f"source {self.name!r}: give spacing or spacing_csv, not both")
        self._check_patterns()
        if self.split is not None:
            check_split(self.split, f"source {self.name!r}: split")
        if self.case_from == self.name:
            raise ValueError(f"source {self.name!r}: case_from names the source itself")
        if not 0.0 <= self.empty_keep_fraction <= 1.0:
            raise ValueError(f"source {self.name!r}: empty_keep_fraction must be in [0, 1]")

    def _check_patterns(self) -> None:
        """Placeholders of the patterns, the case regex, and keys that only pairs read."""
        import re

        where = f"source {self.name!r}"
        allowed = {"image": {"{id}"}, "mask": {"{id}", "{label}"}, "fov": {"{id}"}}
        if self.layout != "pairs":
            allowed["mask"] = {"{id}"}
        for key, ok in allowed.items():
            pattern = getattr(self, key)
            if pattern is None:
                continue
            found = re.findall(r"\{[^{}]*\}", pattern)
            if found.count("{id}") != 1 or set(found) - ok or found.count("{label}") > 1:
                extra = " and at most one {label}" if "{label}" in ok else " and no other {...}"
                raise ValueError(f"{where}: {key}={pattern!r} needs exactly one {{id}}{extra}")
        if self.mask_colors and self.mask and "{label}" in self.mask:
            raise ValueError(
                f"{where}: mask_colors names the labels (one per colour), so the mask pattern "
                f"{self.mask!r} takes no {{label}}: drop {{label}} or mask_colors"
            )
        if self.case is not None:
            try:
                groups = re.compile(self.case).groups
            except re.error as e:
                raise ValueError(f"{where}: case={self.case!r} is not a valid regex ({e})") from e
            if groups < 1:
                raise ValueError(
                    f"{where}: case={self.case!r} has no group: group 1 must capture the case id "
                    "in the image id, e.g. '^(\\d+)' or '^(.*)_\\d+$'"
                )
        if self.layout != "pairs":
            given = [
                k for k in ("spacing", "spacing_csv", "mask_channel", "fov")
                if getattr(self, k) is not None
            ] + (["mask_colors"] if self.mask_colors else []) + (
                ["mask_threshold"] if self.mask_threshold != 127 else []
            )  # fmt: skip
            if given:
                raise ValueError(
                    f"{where}: {', '.join(given)}: only layout pairs (2D image/mask files) "
                    f"reads {'this key' if len(given) == 1 else 'these keys'}; layout "
                    f"{self.layout} takes spacing and labels from its files: remove "
                    f"{'it' if len(given) == 1 else 'them'}"
                )


def _positive(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and 0 < v < 1e9


def check_split(split: dict[str, float], where: str) -> None:
    """ValueError naming `where` unless `split` maps names to fractions >= 0 that sum to 1."""
    bad = {k: v for k, v in split.items() if not (isinstance(v, int | float) and v >= 0)}
    total = sum(v for v in split.values() if isinstance(v, int | float))
    if not split or bad or abs(total - 1) > 1e-6 or total <= 0:
        why = (
            "is empty" if not split else f"has negative fractions {bad}" if bad
            else f"sums to {round(total, 6)}"
        )  # fmt: skip
        raise ValueError(
            f"{where}={split} {why}: give fractions >= 0 that sum to 1, e.g. "
            "{train: 0.8, val: 0.1, test: 0.1}"
        )


@dataclass
class BuildSpec:
    sources: list[SourceSpec]
    name: str = "medbank"
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    clip_radius: int = 2  # neighbours stored per sample: slices z-R..z+R
    max_size: int | None = None  # downscale slices whose longest side exceeds this (px)

    def __post_init__(self):
        check_split(self.split, "split")
        if self.clip_radius < 0:
            raise ValueError(f"clip_radius={self.clip_radius}: give 0 or more slices")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(
                f"max_size={self.max_size}: give a positive size in pixels, or omit it"
            )


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
