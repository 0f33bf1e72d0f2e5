"""DICOM-SEG -> one `Segment` per SegmentNumber, on a reference volume's (Z, Y, X) grid.

Frames are placed on reference slices BY POSITION (the frame's ImagePositionPatient projected on
the slice normal vs the reference's slice positions), never by frame index: writers such as dcmqi
store frames in the opposite order to the image files. When frames carry no position, the
ReferencedSOPInstanceUID of their source image (DerivationImageSequence) places them instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dicom import LPS_TO_RAS, _fg, _read
from .volume import Segment, Volume

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def reference_positions(reference: Volume) -> np.ndarray:
    """(Z, 3) LPS mm position of each reference slice's first voxel: meta["positions"] when it
    matches the volume (DICOM series), else from the affine (NIfTI/NRRD references)."""
    pos = reference.meta.get("positions")
    if pos is not None and len(pos) == reference.shape_zyx[0]:
        return np.asarray(pos, dtype=float)
    lps = LPS_TO_RAS @ reference.affine
    z = np.arange(reference.shape_zyx[0], dtype=float)
    return (lps[:3, 2][None, :] * z[:, None]) + lps[:3, 3][None, :]


def reference_axes(reference: Volume) -> np.ndarray:
    """(3, 3) unit LPS axes of the reference as rows: row cosine (x), column cosine (y), normal."""
    d = (LPS_TO_RAS @ reference.affine)[:3, :3]
    d = d / np.linalg.norm(d, axis=0)
    return np.stack([d[:, 0], d[:, 1], np.cross(d[:, 0], d[:, 1])])


def _source_uid(ds, i: int) -> str | None:
    groups = ds.get("PerFrameFunctionalGroupsSequence")
    for der in (groups[i].get("DerivationImageSequence") or []) if len(groups or []) > i else []:
        for src in der.get("SourceImageSequence") or []:
            if "ReferencedSOPInstanceUID" in src:
                return str(src.ReferencedSOPInstanceUID)
    return None


def _check_grid(ds, path, reference: Volume, axes: np.ndarray) -> None:
    """Frame of reference, frame size and orientation of the SEG must match the reference."""
    ref_for = reference.meta.get("frame_of_reference_uid")
    seg_for = str(ds.get("FrameOfReferenceUID", ""))
    if ref_for and seg_for and seg_for != ref_for:
        raise ValueError(
            f"{path}: FrameOfReferenceUID {seg_for} differs from the reference's {ref_for}: "
            "this SEG was drawn on another scan; pass the image series it references"
        )
    _, ny, nx = reference.shape_zyx
    if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
        raise ValueError(
            f"{path}: frames are {ds.Rows}x{ds.Columns} (Rows x Columns), reference slices are "
            f"{ny}x{nx}: pass the image series this SEG was made on"
        )
    iop = _fg(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if iop is not None and np.abs(np.asarray(iop, float) - axes[:2].ravel()).max() > 1e-3:
        raise ValueError(
            f"{path}: ImageOrientationPatient {list(iop)} differs from the reference's "
            f"{np.round(axes[:2].ravel(), 4).tolist()}: resample one of them first"
        )


def _frame_slices(ds, path, reference: Volume, axes: np.ndarray, n: int) -> list[int]:
    """Reference slice index of each of the `n` frames (position first, then source SOP UID)."""
    pos = reference_positions(reference)
    dist = pos @ axes[2]
    dz, dy, dx = reference.spacing
    uid_to_z = {u: z for z, u in enumerate(reference.meta.get("sop_instance_uids") or []) if u}
    out, unmatched = [], []
    for i in range(n):
        ipp = _fg(ds, i, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is not None:
            ipp = np.asarray(ipp, dtype=float)
            z = int(np.argmin(np.abs(dist - ipp @ axes[2])))
            off = ipp - pos[z]
            if abs(off @ axes[2]) > 0.25 * dz:
                unmatched.append(f"frame {i + 1} at {np.round(ipp, 2).tolist()} (LPS mm)")
                continue
            inplane = np.abs(off @ axes[:2].T)
            if inplane.max() > 0.5 * min(dy, dx):
                raise ValueError(
                    f"{path}: frame {i + 1} starts {np.round(inplane, 2).tolist()} mm (x, y) away "
                    f"from reference slice {z}'s first pixel: the SEG is not on the reference grid"
                )
            out.append(z)
        elif (uid := _source_uid(ds, i)) in uid_to_z:
            out.append(uid_to_z[uid])
        else:
            unmatched.append(f"frame {i + 1} (no position; source SOP {uid})")
    if unmatched:
        z0, z1 = float(dist.min()), float(dist.max())
        raise ValueError(
            f"{path}: {len(unmatched)} of {n} frames match no reference slice (slices span "
            f"{z0:.2f}..{z1:.2f} mm along the normal, tolerance {0.25 * dz:.2f} mm), e.g. "
            f"{unmatched[0]}: pass the image series this SEG was made on"
        )
    return out


def read_dicom_seg(path: str | Path, reference: Volume) -> list[Segment]:
    """Read a DICOM-SEG as one Segment per SegmentNumber (name = SegmentLabel).

    Args:
        path: a Segmentation Storage file (BINARY, FRACTIONAL or LABELMAP).
        reference: the image volume it was drawn on (usually `read_dicom_series`); masks are
            (Z, Y, X) bool on its grid. FRACTIONAL frames are thresholded at half of
            MaximumFractionalValue. A different FrameOfReferenceUID, frame size or orientation,
            or frames that fall on no reference slice, are a ValueError naming the file.
    """
    from pydicom.pixels import iter_pixels

    ds = _read(Path(path))
    sop = str(
        ds.get("SOPClassUID", "") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")
    )
    if ds.get("Modality") != "SEG" and sop != SEG_SOP_CLASS:
        raise ValueError(f"{path}: Modality {ds.get('Modality')!r} is not SEG: not a DICOM-SEG")
    axes = reference_axes(reference)
    _check_grid(ds, path, reference, axes)
    n = int(ds.get("NumberOfFrames") or 1)
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    threshold = (
        0.5 * float(ds.get("MaximumFractionalValue") or 1) if seg_type == "FRACTIONAL" else 1
    )
    segments = {}
    for item in ds.get("SegmentSequence") or []:
        num = int(item.SegmentNumber)
        name = str(item.get("SegmentLabel") or item.get("SegmentDescription") or num)
        segments[num] = Segment(num, name, np.zeros(reference.shape_zyx, dtype=bool))
    if not segments:
        raise ValueError(f"{path}: empty SegmentSequence: the SEG defines no segment")
    slices = _frame_slices(ds, path, reference, axes, n)
    nums = [
        _fg(ds, i, "SegmentIdentificationSequence", "ReferencedSegmentNumber") for i in range(n)
    ]
    bad = sorted({str(x) for x in nums if x is None or int(x) not in segments})
    if bad and seg_type != "LABELMAP":
        raise ValueError(
            f"{path}: frames refer to segment(s) {bad} that SegmentSequence does not define "
            f"(it defines {sorted(segments)}): the file is inconsistent"
        )
    try:
        for i, frame in enumerate(iter_pixels(ds)):
            if seg_type == "LABELMAP":  # pixel values are segment numbers
                for num, seg in segments.items():
                    seg.mask[slices[i]] |= frame == num
            else:
                segments[int(nums[i])].mask[slices[i]] |= frame >= threshold
    except Exception as e:  # decoder missing, or pixel data shorter than the frames
        raise ValueError(f"{path}: cannot decode the SEG pixel data ({e}); truncated?") from e
    return list(segments.values())
