"""DICOM RTSTRUCT -> one `Segment` per ROI, its CLOSED_PLANAR contours rasterised on a reference grid.

Contour points (LPS mm) go through the inverse of the reference's affine (after LPS -> RAS) to voxel
(x=col, y=row, z=slice) coordinates. Each contour lands on the slice nearest its points (within half
a slice spacing; others are skipped and counted in a logged warning) and is filled with
`cv2.fillPoly` at sub-pixel precision. The contours of one ROI on one slice are combined by XOR
(even-odd rule), so a contour inside another is a hole.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from .dicom import LPS_TO_RAS, _read
from .volume import Segment, Volume

log = logging.getLogger(__name__)
_SHIFT = 4  # fractional bits of the fixed-point polygon vertices given to cv2.fillPoly


def _check_frame_of_reference(ds, path, reference: Volume) -> None:
    """A structure set drawn in another FrameOfReferenceUID is a ValueError, unless it names the
    reference's series in RTReferencedSeriesSequence (some writers, e.g. rt-utils, put a fresh
    FrameOfReferenceUID in the structure set): then it is a logged warning."""
    ref_for = reference.meta.get("frame_of_reference_uid")
    frames = ds.get("ReferencedFrameOfReferenceSequence") or []
    fors = {str(f.FrameOfReferenceUID) for f in frames if "FrameOfReferenceUID" in f}
    for roi in ds.get("StructureSetROISequence") or []:
        if "ReferencedFrameOfReferenceUID" in roi:
            fors.add(str(roi.ReferencedFrameOfReferenceUID))
    if not ref_for or not fors or ref_for in fors:
        return
    series = {
        str(se.get("SeriesInstanceUID", ""))
        for f in frames
        for st in f.get("RTReferencedStudySequence") or []
        for se in st.get("RTReferencedSeriesSequence") or []
    }
    if reference.meta.get("series_uid") in series:
        log.warning(
            "%s: ReferencedFrameOfReferenceUID %s differs from the reference's %s, but the "
            "structure set names the reference series %s: using its geometry",
            path,
            sorted(fors),
            ref_for,
            reference.meta["series_uid"],
        )
        return
    raise ValueError(
        f"{path}: ReferencedFrameOfReferenceUID {sorted(fors)} differs from the reference's "
        f"FrameOfReferenceUID {ref_for}: the contours belong to another scan; pass the image "
        "series this RTSTRUCT was drawn on"
    )


def contour_to_voxels(points_lps: np.ndarray, reference: Volume) -> np.ndarray:
    """(N, 3) LPS mm points -> (N, 3) float voxel coordinates (x=col, y=row, z=slice)."""
    inv = np.linalg.inv(LPS_TO_RAS @ reference.affine)  # LPS mm -> voxel
    homog = np.c_[points_lps, np.ones(len(points_lps))]
    return (homog @ inv.T)[:, :3]


def fill_polygon(xy: np.ndarray, shape_yx: tuple[int, int], factor: int = 4) -> np.ndarray:
    """(N, 2) float (col, row) vertices -> (Y, X) bool mask of the pixels the polygon covers by at
    least half: `cv2.fillPoly` on a `factor`x finer grid over the polygon's bounding box, then
    block-averaged. (fillPoly alone also fills every pixel an edge touches, a bias of ~half a
    pixel all round: +20% area for a 10-pixel-wide lesion.)"""
    import cv2

    ny, nx = shape_yx
    out = np.zeros((ny, nx), dtype=bool)
    x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in xy.min(axis=0))
    x1, y1 = min(int(np.ceil(xy[:, 0].max())) + 2, nx), min(int(np.ceil(xy[:, 1].max())) + 2, ny)
    if x1 <= x0 or y1 <= y0:
        return out  # entirely off the image
    fine = np.zeros(((y1 - y0) * factor, (x1 - x0) * factor), dtype=np.uint8)
    # pixel c spans [c - 0.5, c + 0.5); fine pixel j of the box is centred at x0 - 0.5 + (j + 0.5)/f
    uv = (xy - [x0, y0] + 0.5) * factor - 0.5
    pts = np.round(uv * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(fine, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
    frac = fine.reshape(y1 - y0, factor, x1 - x0, factor).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = frac >= 0.5
    return out


def _contour_points(c) -> np.ndarray:
    """(N, 3) ContourData in LPS mm. The raw DS text is parsed with numpy: pydicom's per-value
    DSfloat conversion takes seconds on a whole-body structure set."""
    elem = c.get_item(0x30060050)  # ContourData
    val = [] if elem is None else elem.value
    if isinstance(val, bytes):
        val = [v for v in val.decode("ascii", "replace").strip(" \x00").split("\\") if v.strip()]
    return np.asarray(val if val is not None else [], dtype=float)


def _roi_mask(rc, reference: Volume, counts: Counter) -> np.ndarray:
    """(Z, Y, X) bool mask of one ROIContourSequence item; tallies skipped contours in `counts`."""
    nz, ny, nx = reference.shape_zyx
    mask = np.zeros((nz, ny, nx), dtype=bool)
    for c in rc.get("ContourSequence") or []:
        kind = str(c.get("ContourGeometricType", "")).upper()
        if kind != "CLOSED_PLANAR":
            counts[f"{kind or 'untyped'} (not CLOSED_PLANAR)"] += 1
            continue
        pts = _contour_points(c)
        if pts.size < 9 or pts.size % 3:
            counts["fewer than 3 points"] += 1
            continue
        vox = contour_to_voxels(pts.reshape(-1, 3), reference)
        z = int(np.round(vox[:, 2].mean()))
        if not 0 <= z < nz or np.abs(vox[:, 2] - z).max() > 0.5:
            counts["on no slice (> half a slice spacing off, or oblique)"] += 1
            continue
        mask[z] ^= fill_polygon(vox[:, :2], (ny, nx))
        counts["rasterised"] += 1
    return mask


def read_rtstruct(
    path: str | Path, reference: Volume, names: list[str] | None = None
) -> list[Segment]:
    """Rasterise the ROIs of an RTSTRUCT on `reference`'s grid: one Segment per non-empty ROI.

    Args:
        path: an RT Structure Set file (files without the DICM preamble are read too).
        reference: the image volume the contours were drawn on (usually `read_dicom_series`).
        names: keep only these ROI names (case-insensitive); None keeps all.

    Returns:
        Segments with label_id = ROINumber, name = ROIName, mask (Z, Y, X) bool. ROIs without
        CLOSED_PLANAR contours on the volume (POINT ROIs, empty ROIs, contours off the scanned
        slices) are skipped with a logged warning that counts the skipped contours.
    """
    ds = _read(Path(path))
    if ds.get("Modality") != "RTSTRUCT" and "ROIContourSequence" not in ds:
        raise ValueError(f"{path}: Modality {ds.get('Modality')!r} is not RTSTRUCT")
    _check_frame_of_reference(ds, path, reference)
    roi_names = {
        int(r.ROINumber): str(r.get("ROIName") or r.ROINumber)
        for r in ds.get("StructureSetROISequence") or []
    }
    wanted = None if names is None else {n.strip().lower() for n in names}
    out, seen = [], set()
    for rc in ds.get("ROIContourSequence") or []:
        num = int(rc.ReferencedROINumber)
        name = roi_names.get(num, str(num))
        if wanted is not None and name.strip().lower() not in wanted:
            continue
        seen.add(name.strip().lower())
        counts: Counter = Counter()
        mask = _roi_mask(rc, reference, counts)
        skipped = {k: v for k, v in counts.items() if k != "rasterised"}
        if not mask.any():
            log.warning(
                "%s: ROI %d %r is empty on this volume; skipped (%s)",
                path,
                num,
                name,
                dict(counts) or "no contours",
            )
            continue
        if skipped:
            log.warning(
                "%s: ROI %d %r: %d contours rasterised, skipped %s",
                path,
                num,
                name,
                counts["rasterised"],
                skipped,
            )
        out.append(Segment(num, name, mask))
    if wanted is not None and wanted - seen:
        log.warning(
            "%s: no ROI named %s; ROIs here: %s",
            path,
            sorted(wanted - seen),
            sorted(roi_names.values()),
        )
    return out
