"""DICOM image series -> `Volume`: find the series in a folder and read one, sorted by position.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on the
cross product of the row and column cosines), never by InstanceNumber or file name. The affine maps
voxel (x=col, y=row, z=slice) to world RAS+ mm: DICOM's LPS with the first two axes negated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SOP = "1.2.840.10008.5.1.4.1.1."
_NON_IMAGE_SOP = (_SOP + "66.4", _SOP + "481.", "1.2.840.10008.1.3.10")  # SEG, RT*, DICOMDIR
_NON_IMAGE_MODALITY = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG"}
_PER, _SHARED = "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"
_CODEC_FIX = {  # transfer syntax UID prefix -> packages that decode it (first match wins)
    "1.2.840.10008.1.2.4.8": "pip install pyjpegls  (or: pip install pylibjpeg pylibjpeg-libjpeg)",
    ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20"): "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.": "pip install pylibjpeg pylibjpeg-libjpeg",
    "": "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls",
}


@dataclass
class SeriesInfo:
    """One image series found in a folder; `n_slices` counts frames (multi-frame files > 1)."""

    series_uid: str
    files: list[str]
    modality: str
    description: str
    n_slices: int


def _read(path: Path, headers_only: bool = False):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only, force=True)
    except Exception as e:  # pydicom raises many exception types on corrupt input
        raise ValueError(f"{path}: unreadable DICOM ({type(e).__name__}: {e}); truncated?") from e


def find_series(folder: str | Path) -> list[SeriesInfo]:
    """Group the image files under `folder` (recursive, headers only) by SeriesInstanceUID.

    SEG, RT objects, SR, DICOMDIR and non-DICOM files are skipped. A file with the DICOM preamble
    and an image SOP class whose header stops before Rows is a ValueError naming it (truncated).
    """
    from pydicom.uid import UID

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; pass a folder holding DICOM files")
    groups: dict[str, SeriesInfo] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            head = fh.read(132)
        magic = head[128:132] == b"DICM"
        if not magic and head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
            continue  # no preamble and no group 0002/0008 tag first: not DICOM, don't parse it
        try:
            ds = _read(f, headers_only=True)
        except ValueError:
            if magic:
                raise
            continue
        meta = getattr(ds, "file_meta", {})
        sop = UID(str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or ""))
        if sop.startswith(_NON_IMAGE_SOP) or ds.get("Modality", "") in _NON_IMAGE_MODALITY:
            continue
        if "SeriesInstanceUID" not in ds and magic and "Image" in sop.name:  # header cut short
            raise ValueError(f"{f}: {sop.name} header stops before SeriesInstanceUID: truncated?")
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:  # no pixels, or not DICOM
            continue
        desc, num = str(ds.get("SeriesDescription", "")), ds.get("SeriesNumber") or ""
        uid = str(ds.SeriesInstanceUID) or f"blank-uid:{num}:{desc}"  # over-anonymised files
        info = groups.setdefault(uid, SeriesInfo(uid, [], str(ds.get("Modality", "")), desc, 0))
        info.files.append(str(f))
        info.n_slices += int(ds.get("NumberOfFrames") or 1)
    return list(groups.values())


def _codec_error(path, ts, missing: list[str]) -> ValueError:
    fix = next(v for k, v in _CODEC_FIX.items() if str(ts).startswith(k))
    return ValueError(
        f"{path}: pixel data is compressed as '{getattr(ts, 'name', ts)}' ({ts}) and no installed"
        f" decoder can read it; fix: {fix} (pydicom's plugins: {'; '.join(missing) or '?'})"
    )


def _fg(ds, i: int, seq: str, attr: str):
    """`attr` at the top level, else in per-frame functional group `i`, else the shared group."""
    if attr in ds:
        return ds[attr].value
    for groups, idx in ((_PER, i), (_SHARED, 0)):
        items = ds.get(groups)
        if items and len(items) > idx and items[idx].get(seq) and attr in items[idx].get(seq)[0]:
            return items[idx].get(seq)[0][attr].value
    return None


def _pixels(ds, path) -> np.ndarray:
    """(frames, rows, cols) float32 after the modality LUT (CT: HU); colour: (frames, r, c, 3)."""
    from pydicom.pixels import apply_modality_lut

    if "PixelData" not in ds:
        raise ValueError(f"{path}: no PixelData element (truncated file, or not an image)")
    try:
        arr = ds.pixel_array
    except Exception as e:  # RuntimeError (no decoder), ValueError (short data), ...
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        if ts is not None and ts.is_compressed and str(e).startswith("Unable to dec"):
            # pydicom lists the missing (decompress) or failing (decode) plugins, one per line
            raise _codec_error(path, ts, [s.strip() for s in str(e).splitlines()[1:]]) from e
        raise ValueError(f"{path}: cannot decode PixelData ({e}); truncated or corrupt?") from e
    arr = arr.reshape(n := int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns, -1)
    if arr.shape[-1] > 1:
        return arr  # colour, as stored
    arr = arr[..., 0]
    if _PER not in ds or "RescaleSlope" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    out = arr.astype(np.float32)
    for i in range(n):  # enhanced multi-frame: rescale per frame from the functional groups
        slope = _fg(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _fg(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        out[i] = out[i] * float(1.0 if slope is None else slope) + float(inter or 0.0)
    return out


def _resolve(path, series_uid: str | None) -> tuple[list[Path], str]:
    """(files of one series, a source string for messages) from a folder, file or list."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ValueError("read_dicom_series: empty list of files")
        return [Path(p) for p in path], str(Path(path[0]).parent)
    p = Path(path)
    if p.is_file():
        return [p], str(p)
    if not p.is_dir():
        raise ValueError(f"{p}: no such file or folder")
    series = find_series(p)
    found = "; ".join(
        f"{s.series_uid} ({s.modality} '{s.description}', {s.n_slices})" for s in series
    )
    hits = [s for s in series if series_uid in (None, s.series_uid)]
    if not hits:
        raise ValueError(f"{p}: no image series {series_uid or ''} here; found: {found or 'none'}")
    if len(hits) > 1:
        raise ValueError(
            f"{p}: holds {len(hits)} series; choose one: spec item key `series_uid:` (medbank), "
            f"`samed2 predict --series-uid` or read_volume(..., series_uid=); found: {found}"
        )
    return [Path(f) for f in hits[0].files], str(p)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.2f}" for x in v) + ")"


def _slice_step(d: np.ndarray, ipps: np.ndarray, source: str) -> float:
    """Median spacing (mm) of sorted positions `d` along the normal; gaps/duplicates raise."""
    steps = np.diff(d)
    if (dup := np.nonzero(steps < 1e-3)[0]).size:
        raise ValueError(
            f"{source}: duplicate slice positions: 2+ slices at {_fmt(ipps[dup[0]])} (LPS mm); "
            "several acquisitions/echoes in one series? Split it or remove the duplicates"
        )
    med = float(np.median(steps))
    if (bad := np.nonzero((steps > 1.5 * med) | (steps < med / 1.5))[0]).size:
        k = bad[0]
        raise ValueError(
            f"{source}: gap in slice positions: {steps[k]:.2f} mm between slices at "
            f"{_fmt(ipps[k])} and {_fmt(ipps[k + 1])} (LPS mm), median spacing {med:.2f} mm: "
            "missing slices? Re-export the complete series"
        )
    return med


def read_dicom_series(path, series_uid: str | None = None) -> Volume:
    """Read a DICOM image series as a (Z, Y, X) float32 Volume (CT in HU), sorted by position.

    `path`: a folder (one image series, or pick one with `series_uid`), a list of files, or one
    file (single- or multi-frame). Spacing (z, y, x) mm: z = median step along the slice normal
    (single slice: SpacingBetweenSlices/SliceThickness), y, x = PixelSpacing (row, col).
    Colour images come back as (Z, Y, X, 3) as stored. meta: modality, series_uid, study_uid,
    sop_instance_uids and positions (LPS mm) in z order, frame_of_reference_uid, window
    (center, width) or None, source, description, files (z order), spacing_known.
    """
    files, source = _resolve(path, series_uid)
    dsets = [(f, _read(f)) for f in files]
    if len(uids := {str(ds.get("SeriesInstanceUID", "")) for _, ds in dsets}) > 1:
        raise ValueError(f"{source}: files of {len(uids)} series {sorted(uids)}; pass one series")
    if len(shapes := {(ds.get("Rows"), ds.get("Columns")) for _, ds in dsets}) != 1:
        raise ValueError(f"{source}: slices differ in size (Rows, Columns): {shapes}")
    frames = []  # (file, dataset, frame index, orientation, position, pixel spacing)
    for f, ds in dsets:
        if (n := int(ds.get("NumberOfFrames") or 1)) > 1 and len(dsets) > 1:
            raise ValueError(f"{f}: a {n}-frame file mixed with other files; read it alone")
        for i in range(n):
            iop = _fg(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = _fg(ds, i, "PlanePositionSequence", "ImagePositionPatient")
            ps = _fg(ds, i, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
            frames.append((f, ds, i, iop, ipp, ps))
    ds0 = dsets[0][1]
    known = all(fr[3] is not None and fr[4] is not None for fr in frames)
    if not known and len(dsets) > 1:
        bad = next(fr[0] for fr in frames if fr[3] is None or fr[4] is None)
        raise ValueError(f"{bad}: no ImagePositionPatient/ImageOrientationPatient; cannot sort")
    iops = np.array([fr[3] if known else [1, 0, 0, 0, 1, 0] for fr in frames], dtype=float)
    k = int(np.abs(iops - iops[0]).max(axis=1).argmax())
    if np.abs(iops[k] - iops[0]).max() > 1e-3:
        raise ValueError(
            f"{source}: ImageOrientationPatient differs: {_fmt(iops[0])} in {frames[0][0].name} vs "
            f"{_fmt(iops[k])} in {frames[k][0].name}; not one stack (localizer?): pick another series"
        )
    row, col = iops[0, :3], iops[0, 3:]
    normal = np.cross(row, col)
    ipps = np.array([fr[4] if known else [0, 0, 0] for fr in frames], dtype=float)
    order = np.argsort(ipps @ normal, kind="stable")
    frames, ipps = [frames[j] for j in order], ipps[order]
    dz = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)  # 1 slice
    if len(frames) > 1 and known:
        dz = _slice_step(ipps @ normal, ipps, source)
    ps = frames[0][5]
    dy, dx = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    decoded = {f: _pixels(ds, f) for f, ds in dsets}  # (frames, rows, cols) per file
    planes = [decoded[f][i] for f, _, i, *_ in frames]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, normal * dz, ipps[0]
    wc, ww = ds0.get("WindowCenter"), ds0.get("WindowWidth")
    window = None if wc is None or ww is None else (float(np.ravel(wc)[0]), float(np.ravel(ww)[0]))
    meta = {
        "modality": str(ds0.get("Modality", "")),
        "series_uid": str(ds0.get("SeriesInstanceUID", "")),
        "study_uid": str(ds0.get("StudyInstanceUID", "")),
        "sop_instance_uids": [str(fr[1].get("SOPInstanceUID", "")) for fr in frames],
        "positions": [[float(v) for v in p] for p in ipps],
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
        "window": window,
        "source": source,
        "description": str(ds0.get("SeriesDescription", "")),
        "files": [str(fr[0]) for fr in frames],
        "spacing_known": bool(ps) and known,
    }
    return Volume(np.stack(planes), (dz, dy, dx), LPS_TO_RAS @ lps, meta)
