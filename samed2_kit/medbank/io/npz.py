"""Reader for MedSAM-style ``.npz`` archives: ``imgs`` (+ optional ``gts`` and ``spacing``).

Layout written by MedSAM's ``pre_CT_MR.py`` (bowang-lab/MedSAM) and read by MedSAM/MedSAM2 and the
CVPR MedSAM-on-laptop challenge code: ``imgs`` (D, H, W) uint8 from SimpleITK's
``GetArrayFromImage`` (z, y, x), ``gts`` (D, H, W) integer labels, ``spacing`` =
``img_sitk.GetSpacing()``, which SimpleITK returns in (x, y, z) order. So ``spacing`` is read as
(x, y, z) by default and reversed to the Volume's (z, y, x); pass ``spacing_order="zyx"`` for files
that store it the other way. MedSAM keeps only the slices that hold labels, so consecutive ``imgs``
slices may not be adjacent in the scan: the z spacing is the scan's, not the gap between them.
2D archives hold ``imgs`` (H, W) or (H, W, 3) and ``gts`` (H, W).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from samed2_kit.medbank.io.labels import check_finite, to_label_array
from samed2_kit.medbank.io.volume import Volume, affine_from_spacing


def _get(archive, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as exc:  # object arrays need pickle, which is never used
        raise ValueError(
            f"{path}: key {key!r} holds a Python object array (pickled data), which is never "
            "loaded (unsafe). Save plain numeric arrays, e.g. np.savez_compressed(path, "
            "imgs=imgs.astype(np.uint8), gts=gts.astype(np.uint8))"
        ) from exc


def _spacing_zyx(raw: np.ndarray, order: str, is_2d: bool, path: Path) -> tuple[float, ...]:
    values = np.asarray(raw, dtype=float).ravel()
    if values.size == 2 and is_2d:
        values = np.append(values, 1.0) if order == "xyz" else np.insert(values, 0, 1.0)
    if values.size != 3 or not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(
            f"{path}: 'spacing' is {values.tolist()}; expected 3 positive mm values "
            f"({'x, y, z' if order == 'xyz' else 'z, y, x'})"
        )
    zyx = values[::-1] if order == "xyz" else values
    return tuple(float(v) for v in zyx)


def _load_arrays(path: Path) -> tuple[list[str], np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(keys, imgs, gts or None, spacing or None) of an existing .npz archive, never unpickled."""
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist (check the path)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"cannot read {path} as an .npz archive ({exc}); pickled files are never loaded. "
            "Save arrays with np.savez_compressed(path, imgs=..., gts=...)"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path} holds a single .npy array, not an .npz archive; save it with "
            "np.savez_compressed(path, imgs=array)"
        )
    with archive:
        keys = list(archive.files)
        if "imgs" not in keys:
            raise ValueError(
                f"{path} has no 'imgs' array (keys found: {keys}); a MedSAM-style npz needs "
                "'imgs' (D, H, W) or (H, W[, 3]), optionally 'gts' and 'spacing'"
            )
        imgs = _get(archive, "imgs", path)
        gts = _get(archive, "gts", path) if "gts" in keys else None
        spacing_raw = _get(archive, "spacing", path) if "spacing" in keys else None
    return keys, imgs, gts, spacing_raw


def _check_grids(
    imgs: np.ndarray, gts: np.ndarray | None, path: Path
) -> tuple[np.ndarray, np.ndarray | None]:
    """`imgs` as (D, H, W) or (D, H, W, 3) (2D gets D=1) and `gts` as (D, H, W) integer labels."""
    if imgs.dtype.kind not in "biuf":
        raise ValueError(f"{path}: 'imgs' has dtype {imgs.dtype}; expected numbers")
    rgb_2d = imgs.ndim == 3 and imgs.shape[2] == 3 and (gts is None or gts.shape == imgs.shape[:2])
    if imgs.ndim == 2 or rgb_2d:
        imgs = imgs[None]
    elif imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[3] != 3):
        raise ValueError(
            f"{path}: 'imgs' has shape {imgs.shape}; expected (D, H, W), (H, W), (H, W, 3) or "
            "(D, H, W, 3)"
        )
    check_finite(imgs, f"{path} 'imgs'")
    if gts is not None:
        if gts.ndim == 2:
            gts = gts[None]
        if gts.shape != imgs.shape[:3]:
            raise ValueError(
                f"{path}: 'gts' has shape {gts.shape}, 'imgs' has {imgs.shape}: they must share "
                "the (D, H, W) grid"
            )
        gts = to_label_array(gts, f"{path} 'gts'")
    return imgs, gts


def read_npz(path: str | Path, spacing_order: str = "xyz") -> tuple[Volume, Volume | None]:
    """Read a MedSAM-style ``.npz`` archive (loaded with ``allow_pickle=False``, always).

    Args:
        path: the ``.npz`` file.
        spacing_order: order of the 3 values in the ``spacing`` key: "xyz" (MedSAM, SimpleITK's
            GetSpacing) or "zyx".

    Returns:
        (image, labels): image Volume with array (Z, Y, X) or (1, H, W) / (1, H, W, 3) for 2D,
        stored dtype; labels Volume (Z, Y, X) integer from ``gts`` on the same grid, or None
        when the archive has no ``gts``. Spacing (z, y, x) mm from ``spacing`` (1.0 and
        meta["spacing_known"] False when absent); affine = diagonal spacing, origin 0 (npz keeps
        no orientation). ``imgs`` of shape (H, W, 3) is read as a 2D RGB image when ``gts`` is
        absent or (H, W); otherwise as a volume of 3-pixel-wide slices.

    Raises:
        ValueError: not an npz archive, no ``imgs`` (lists the keys found), object (pickled)
            arrays, ``gts`` shape differing from ``imgs``, bad ``spacing``, NaN/inf voxels.
    """
    path = Path(path)
    if spacing_order not in ("xyz", "zyx"):
        raise ValueError(f"spacing_order must be 'xyz' or 'zyx', got {spacing_order!r}")
    keys, imgs, gts, spacing_raw = _load_arrays(path)
    imgs, gts = _check_grids(imgs, gts, path)

    is_2d = imgs.shape[0] == 1
    if spacing_raw is not None:
        spacing = _spacing_zyx(spacing_raw, spacing_order, is_2d, path)
    else:
        spacing = (1.0, 1.0, 1.0)
    affine = affine_from_spacing(spacing)
    meta = {
        "source": str(path),
        "format": "npz",
        "keys": keys,
        "spacing_known": spacing_raw is not None,
        "spacing_order": spacing_order,
        "dtype": str(imgs.dtype),
    }
    image = Volume(np.ascontiguousarray(imgs), spacing, affine, {**meta, "is_label_map": False})
    if gts is None:
        return image, None
    labels = Volume(
        np.ascontiguousarray(gts), spacing, affine.copy(), {**meta, "is_label_map": True}
    )
    labels.meta["dtype"] = str(gts.dtype)
    return image, labels
