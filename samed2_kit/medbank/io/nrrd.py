"""NRRD reader (.nrrd, detached .nhdr) returning a `Volume` in (z, y, x) order with a RAS+ affine."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np

from samed2_kit.medbank.io.labels import check_finite, to_label_array
from samed2_kit.medbank.io.volume import Volume

# World-axis sign flips that take each NRRD `space` to RAS+.
_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}
# Axis kinds that are sampled space (everything else, e.g. "vector", "RGB-color", "list", is not).
_SPATIAL_KINDS = {"domain", "space", "???", "none"}


def _spatial_axes(header: dict) -> list[bool]:
    """One flag per file axis: True for a spatial axis (a `space directions` vector, or kind
    domain/space when there are no directions)."""
    dim = int(header["dimension"])
    sd = header.get("space directions")
    if sd is not None:
        sd = np.asarray(sd, dtype=float)
        return [not np.isnan(sd[i]).any() for i in range(dim)]
    kinds = header.get("kinds")
    if kinds is not None:
        return [str(k).lower() in _SPATIAL_KINDS for k in kinds]
    return [True] * dim


def _segment_names(header: dict) -> dict[int, str]:
    """{label value: name} from 3D Slicer .seg.nrrd fields (SegmentN_Name, SegmentN_LabelValue)."""
    names = {}
    for key, value in header.items():
        m = re.fullmatch(r"Segment(\d+)_Name", str(key))
        if m and f"Segment{m.group(1)}_LabelValue" in header:
            try:
                names[int(header[f"Segment{m.group(1)}_LabelValue"])] = str(value)
            except (TypeError, ValueError):
                continue
    return names


def _load_nrrd(path: Path) -> tuple[np.ndarray, dict]:
    """(data in file-axis order (index_order="F"), header) of an existing, readable NRRD file."""
    import nrrd

    if not path.is_file():
        raise FileNotFoundError(f"NRRD file {path} does not exist (check the path)")
    try:
        return nrrd.read(str(path), index_order="F")
    except (nrrd.NRRDError, OSError, EOFError, ValueError, KeyError, zlib.error) as exc:
        raise ValueError(
            f"cannot read {path} as NRRD ({exc}); check that it is a NRRD file (and, for a "
            ".nhdr, that its data file sits beside it) and that it is not truncated"
        ) from exc


def _scalar_data(data: np.ndarray, header: dict, path: Path) -> tuple[np.ndarray, list[int], list]:
    """(data with only its 2 or 3 spatial axes (x, y[, z]), their file-axis indices, kinds per
    file axis); non-scalar files or other axis counts raise ValueError."""
    spatial = _spatial_axes(header)
    kinds = list(header.get("kinds") or [None] * data.ndim)
    extra = [i for i, s in enumerate(spatial) if not s]
    if any(data.shape[i] != 1 for i in extra):
        desc = ", ".join(f"axis {i} (kind {kinds[i]!r}, size {data.shape[i]})" for i in extra)
        raise ValueError(
            f"{path} is not a scalar volume: {desc} is not spatial (vector/RGB/layers/time). "
            "Only scalar 2D/3D NRRD is supported: save one component, channel or segment layer "
            "as its own file"
        )
    axes = [i for i, s in enumerate(spatial) if s]
    if len(axes) not in (2, 3):
        raise ValueError(
            f"{path} has {len(axes)} spatial axes (sizes {data.shape}); expected a 2D or 3D image"
        )
    return data.reshape([data.shape[i] for i in axes], order="F"), axes, kinds


def _ras_flip(space, path: Path) -> np.ndarray:
    """(3,) world-axis signs that take the file's `space` to RAS+ (LPS when absent or unknown)."""
    space_key = str(space).lower() if space is not None else None
    if space_key is not None and space_key.endswith("time"):
        raise ValueError(f"{path}: space {space!r} has a time axis; only 3D spaces are supported")
    return np.array(_SPACE_TO_RAS.get(space_key, _SPACE_TO_RAS["lps"]))


def _directions(header: dict, axes: list[int], path: Path) -> tuple[np.ndarray, bool]:
    """(3, 3) world step (mm) per voxel axis x, y, z as columns, from `space directions` (or
    `spacings`; 1.0 when absent), and whether the spacing was known. For 2 spatial axes z is the
    unit normal of the x-y plane."""
    directions = np.zeros((3, 3))  # columns: file axes x, y, z in the file's world space
    sd = header.get("space directions")
    spacing_known = True
    if sd is not None:
        sd = np.asarray(sd, dtype=float)[axes]
        if sd.shape[1] > 3:
            raise ValueError(f"{path}: space directions {sd.tolist()} have more than 3 components")
        directions[: sd.shape[1], : len(axes)] = sd.T
    else:
        spacings = header.get("spacings")
        steps = np.asarray(spacings, dtype=float)[axes] if spacings is not None else None
        if steps is None or not np.all(np.isfinite(steps) & (steps != 0)):
            steps, spacing_known = np.ones(len(axes)), False
        directions[: len(axes), : len(axes)] = np.diag(steps)
    if len(axes) == 2:  # one-slice volume: z is the unit normal of the x-y plane
        normal = np.cross(directions[:, 0], directions[:, 1])
        directions[:, 2] = normal / (np.linalg.norm(normal) or 1.0)
    return directions, spacing_known


def _ras_affine(directions: np.ndarray, header: dict, flip: np.ndarray) -> np.ndarray:
    """(4, 4) affine voxel (x, y, z) -> RAS+ mm from the (3, 3) directions, `space origin` and
    the (3,) world-axis flip."""
    origin = np.zeros(3)
    if header.get("space origin") is not None:
        so = np.asarray(header["space origin"], dtype=float)
        origin[: min(3, so.size)] = so[:3]
    affine = np.eye(4)
    affine[:3, :3] = flip[:, None] * directions
    affine[:3, 3] = flip * origin
    affine += 0.0  # no negative zeros from the flips
    return affine


def read_nrrd(path: str | Path, labels: bool = False) -> Volume:
    """Read a scalar 3D (or 2D) NRRD file; detached headers (.nhdr + data file) work too.

    Args:
        path: .nrrd or .nhdr file.
        labels: False (image): the stored dtype is kept (NRRD has no value scaling).
            True (label map): integer array; float data must hold whole numbers.

    Returns:
        Volume with array (Z, Y, X) (the file's first axis, the fastest, is x), spacing (z, y, x)
        mm = norms of the `space directions` vectors (or `spacings`; 1.0 when absent, with
        meta["spacing_known"] False), affine voxel (x, y, z) -> RAS+ mm: `space directions` as
        columns and `space origin` as translation, with the world x and y axes negated for an
        LPS space (x only for LAS). A file without `space` (or with scanner-xyz /
        3D-right-handed) is taken as LPS, as ITK does; meta["space"] records what the file said.
        meta also holds source, format, dtype, kinds, is_label_map, and "labels" ({value: name})
        for 3D Slicer segmentations (.seg.nrrd).

    Raises:
        ValueError: not a readable NRRD, a non-scalar file (vector, RGB, several layers or time
            points), NaN/inf voxels (with the count), non-integer values with ``labels=True``.
    """
    path = Path(path)
    data, header = _load_nrrd(path)
    data, axes, kinds = _scalar_data(data, header, path)
    space = header.get("space")
    flip = _ras_flip(space, path)
    directions, spacing_known = _directions(header, axes, path)
    if len(axes) == 2:
        data = data[:, :, None]
    spacing_xyz = np.linalg.norm(directions, axis=0)
    if not np.all(np.isfinite(spacing_xyz) & (spacing_xyz > 0)):
        raise ValueError(
            f"{path}: space directions {directions.T.tolist()} give a zero-length axis; fix the "
            "'space directions' field"
        )
    affine = _ras_affine(directions, header, flip)

    arr = to_label_array(data, path) if labels else data
    check_finite(arr, path)
    meta = {
        "source": str(path),
        "format": "nrrd",
        "space": space,
        "dtype": str(data.dtype),
        "kinds": kinds,
        "spacing_known": spacing_known,
        "is_label_map": bool(labels),
    }
    names = _segment_names(header)
    if names:
        meta["labels"] = names
    z, y, x = (float(s) for s in spacing_xyz[::-1])
    return Volume(
        array=np.ascontiguousarray(arr.transpose(2, 1, 0)),
        spacing=(z, y, x),
        affine=affine,
        meta=meta,
    )
