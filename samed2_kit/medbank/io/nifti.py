"""NIfTI reader (.nii, .nii.gz) returning a `Volume` in (z, y, x) order with a RAS+ affine."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from samed2_kit.medbank.io.labels import check_finite, to_label_array
from samed2_kit.medbank.io.volume import Volume

# NIfTI spatial units -> mm (nibabel reports the header's xyz unit; its affine is not converted).
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


def _spatial_shape(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """(X, Y, Z) of a NIfTI data shape; 2D gets Z=1, trailing singleton dims are dropped."""
    if len(shape) < 2:
        raise ValueError(f"NIfTI file {path} has data shape {shape}; expected a 2D or 3D image")
    extra = shape[3:]
    if any(n != 1 for n in extra):
        raise ValueError(
            f"4D NIfTI ({path}, shape {shape}) not supported: pick a volume with "
            "nibabel.load(path).slicer[..., i] (or nibabel.funcs.four_to_three) and save it as "
            "its own 3D file"
        )
    if len(shape) == 2:
        return (shape[0], shape[1], 1)
    return (shape[0], shape[1], shape[2])


def _load_nifti(path: Path):
    """The nibabel NIfTI image (header + lazy data) of an existing, readable .nii/.nii.gz file."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file {path} does not exist (check the path)")
    try:
        img = nib.load(str(path))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(
            f"cannot read {path} as NIfTI ({exc}); check that it is a .nii/.nii.gz file and not "
            "truncated, or a different format with the wrong extension"
        ) from exc
    if not isinstance(img, nib.Nifti1Pair):
        raise ValueError(
            f"{path} is a {type(img).__name__}, not NIfTI; convert it to .nii.gz (e.g. with "
            "nibabel or SimpleITK)"
        )
    return img


def _voxels(img, labels: bool, path: Path) -> np.ndarray:
    """(Z, Y, X) C-contiguous voxels: scaled float32 for an image, integers for a label map."""
    shape_xyz = _spatial_shape(tuple(int(n) for n in img.shape), path)
    try:
        if labels:
            raw = np.asanyarray(img.dataobj)
        else:
            raw = img.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise ValueError(f"cannot read the voxel data of {path} ({exc}): is it truncated?") from exc
    raw = raw.reshape(shape_xyz, order="A")
    arr = to_label_array(raw, path) if labels else raw
    check_finite(arr, path)
    return np.ascontiguousarray(arr.transpose(2, 1, 0))


def _geometry_mm(img, path: Path) -> tuple[np.ndarray, list[float], str]:
    """(affine voxel (x, y, z) -> RAS+ mm (4, 4), spacing (x, y, z) mm, the header's xyz unit)."""
    hdr = img.header
    unit = hdr.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(unit, 1.0)
    affine = np.array(img.affine, dtype=float)
    affine[:3, :] *= scale
    affine[3] = (0.0, 0.0, 0.0, 1.0)
    zooms = [float(z) for z in hdr.get_zooms()[:3]] + [1.0] * (3 - len(hdr.get_zooms()[:3]))
    col_norms = np.linalg.norm(affine[:3, :3], axis=0)
    xyz = [
        z * scale if np.isfinite(z) and z > 0 else float(n)
        for z, n in zip(zooms, col_norms, strict=True)
    ]
    if not all(np.isfinite(s) and s > 0 for s in xyz):
        raise ValueError(
            f"{path}: voxel sizes (pixdim) {zooms} and affine give no positive spacing; fix pixdim "
            "in the header"
        )
    return affine, xyz, unit


def read_nifti(path: str | Path, labels: bool = False) -> Volume:
    """Read a NIfTI-1/NIfTI-2 file (.nii or .nii.gz).

    Args:
        path: the file.
        labels: False (image): values with the header's scl_slope/scl_inter applied, as float32
            (CT in HU). True (label map): integer array; the stored integer dtype is kept
            (uint8 for TotalSegmentator), scaled or float data must hold whole numbers.

    Returns:
        Volume with array (Z, Y, X) (NIfTI stores (X, Y, Z); transposed, C-contiguous),
        spacing (z, y, x) mm from the header's pixdim (zooms), affine = nibabel's ``img.affine``
        (sform if its code > 0, else qform, else pixdim only), voxel (x, y, z) -> RAS+ mm.
        meta: source, format, qform_code, sform_code, affine_source, dtype (on-disk), orientation
        (axis codes such as "RAS" or "LPS"), xyz_units, is_label_map.

    Raises:
        ValueError: not a readable NIfTI, true 4D data, NaN/inf voxels (with the count),
            non-integer values with ``labels=True``.
    """
    import nibabel as nib

    path = Path(path)
    img = _load_nifti(path)
    hdr = img.header
    arr = _voxels(img, labels, path)
    affine, xyz, unit = _geometry_mm(img, path)
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    meta = {
        "source": str(path),
        "format": "nifti",
        "qform_code": qcode,
        "sform_code": scode,
        "affine_source": "sform" if scode > 0 else "qform" if qcode > 0 else "pixdim only",
        "dtype": str(hdr.get_data_dtype()),
        "orientation": "".join(str(c) for c in nib.aff2axcodes(affine)),
        "xyz_units": unit,
        "is_label_map": bool(labels),
    }
    return Volume(array=arr, spacing=(xyz[2], xyz[1], xyz[0]), affine=affine, meta=meta)
