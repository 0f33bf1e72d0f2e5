"""The one contract every medbank reader returns: an array with its geometry and metadata.

Axis order is always (z, y, x) = (slice, row, column); 2D images are volumes with one slice.
`affine` maps voxel indices (x, y, z) = (column, row, slice), as a column vector [x, y, z, 1], to
world coordinates in mm, RAS+ (NIfTI's convention; DICOM's LPS is converted by flipping x and y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    """An image or a label map.

    array: (Z, Y, X) scalars (CT in HU, MR/others as stored; labels as integers), or
        (Z, Y, X, 3) RGB for colour 2D images.
    spacing: (z, y, x) voxel size in mm (2D images without a known pixel size: 1.0, see meta).
    affine: (4, 4) voxel (x, y, z) -> world RAS+ mm.
    meta: reader-specific facts, e.g. {"modality": "CT", "series_uid": ..., "labels": {1: "liver"},
        "spacing_known": False, "source": path}.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"Volume.array must be (Z, Y, X) or (Z, Y, X, 3), got {self.array.shape}"
            )
        if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(
                f"Volume.spacing must be 3 positive mm values (z, y, x), got {self.spacing}"
            )

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[:3])

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit axis directions (columns: x, y, z axes) in world RAS+."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """World RAS+ position (mm) of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()


def affine_from_spacing(spacing_zyx, origin_xyz=(0.0, 0.0, 0.0), direction=None) -> np.ndarray:
    """A (4, 4) affine from spacing (z, y, x) mm, an origin (x, y, z) and a (3, 3) direction."""
    a = np.eye(4)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    a[:3, :3] = d * np.array([spacing_zyx[2], spacing_zyx[1], spacing_zyx[0]])[None, :]
    a[:3, 3] = origin_xyz
    return a


def same_geometry(a: Volume, b: Volume, atol_mm: float = 1e-3) -> bool:
    """True when two volumes share shape (z, y, x) and affine (within `atol_mm`)."""
    return a.shape_zyx == b.shape_zyx and np.allclose(a.affine, b.affine, atol=atol_mm)


@dataclass
class Segment:
    """One labelled structure as a binary mask on a reference volume's grid (Z, Y, X) bool.
    DICOM-SEG segments and RTSTRUCT ROIs may overlap, so they are not merged into one label map."""

    label_id: int
    name: str
    mask: np.ndarray


def segments_from_labelmap(labels: Volume, names: dict[int, str] | None = None) -> list[Segment]:
    """Split an integer label map into one Segment per non-zero value (names default to str(id)).

    Non-integer values are a ValueError naming the source and an example value.
    """
    arr = labels.array
    src = labels.meta.get("source", "label map")
    if arr.ndim != 3:
        raise ValueError(f"{src}: a label map must be (Z, Y, X), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{src}: label map holds NaN/inf values; labels must be integers")
        frac = arr[arr != np.round(arr)]
        if frac.size:
            raise ValueError(
                f"{src}: label map holds non-integer values (e.g. {float(frac.flat[0])}); "
                "labels must be integers: is this an image rather than a label map?"
            )
        arr = arr.astype(np.int64)
    names = names or labels.meta.get("labels") or {}
    return [
        Segment(int(v), str(names.get(int(v), int(v))), arr == v) for v in np.unique(arr) if v != 0
    ]
