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
_NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.8": "RTIONPLAN",
    "1.2.840.10008.1.3.10": "DICOMDIR",
}
_NON_IMAGE_MODALITY = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG"}


@dataclass
class SeriesInfo:
    """One image series found in a folder; `n_slices` counts frames (multi-frame files > 1)."""

    series_uid: str
    files: list[str]
    modality: str
    description: str
    n_slices: int


def _has_dicm_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"


def _read(path: Path, headers_only: bool = False):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=headers_only, force=True)
    except Exception as e:  # pydicom raises many exception types on corrupt input
        raise ValueError(f"{path}: unreadable DICOM ({type(e).__name__}: {e}); truncated?") from e


def _sop_class(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")


def _is_image(ds) -> bool:
    return (
        "Rows" in ds
        and "SeriesInstanceUID" in ds
        and _sop_class(ds) not in _NON_IMAGE_SOP
        and str(ds.get("Modality", "")).upper() not in _NON_IMAGE_MODALITY
    )


def find_series(folder: str | Path) -> list[SeriesInfo]:
    """Group the image files under `folder` (recursive, headers only) by SeriesInstanceUID.

    SEG, RTSTRUCT, RTPLAN, RTDOSE, SR, DICOMDIR and non-DICOM files are skipped. A file with the
    DICOM preamble of an image SOP class whose header stops early is a ValueError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; pass a folder holding DICOM files")
    groups: dict[str, SeriesInfo] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        magic = _has_dicm_magic(f)
        try:
            ds = _read(f, headers_only=True)
        except ValueError:
            if magic:
                raise
            continue
        if not _is_image(ds):
            if (
                magic
                and _sop_class(ds)
                and _sop_class(ds) not in _NON_IMAGE_SOP
                and "Rows" not in ds
            ):
                if str(ds.get("Modality", "")).upper() not in _NON_IMAGE_MODALITY:
                    raise ValueError(f"{f}: DICOM header ends before Rows: truncated or corrupt")
            continue
        uid = str(ds.SeriesInstanceUID)
        desc = str(ds.get("SeriesDescription", ""))
        info = groups.setdefault(uid, SeriesInfo(uid, [], str(ds.get("Modality", "")), desc, 0))
        info.files.append(str(f))
        info.n_slices += int(ds.get("NumberOfFrames") or 1)
    return list(groups.values())


def _codec_error(path, ts, missing: list[str]) -> ValueError:
    s = str(ts)
    if s in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        fix = "pip install pyjpegls  (or: pip install pylibjpeg pylibjpeg-libjpeg)"
    elif s.startswith(("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")):
        fix = "pip install pylibjpeg pylibjpeg-openjpeg"
    elif s.startswith("1.2.840.10008.1.2.4."):
        fix = "pip install pylibjpeg pylibjpeg-libjpeg"
    else:
        fix = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pyjpegls"
    opts = "; ".join(missing) or "none known"
    return ValueError(
        f"{path}: pixel data is compressed as '{getattr(ts, 'name', s)}' ({s}) and no decoder is "
        f"installed; fix: {fix} (pydicom's plugins: {opts})"
    )


def _fg(ds, i: int, seq: str, attr: str):
    """`attr` at the top level, else in per-frame functional group `i`, else the shared group."""
    if attr in ds:
        return ds[attr].value
    for groups, idx in (
        ("PerFrameFunctionalGroupsSequence", i),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > idx and items[idx].get(seq) and attr in items[idx].get(seq)[0]:
            return items[idx].get(seq)[0][attr].value
    return None


def _pixels(ds, path) -> np.ndarray:
    """(frames, rows, cols) float32 after the modality LUT (CT: HU); colour: (frames, r, c, 3)."""
    from pydicom.pixels import apply_modality_lut, get_decoder

    if "PixelData" not in ds:
        raise ValueError(f"{path}: no PixelData element (truncated file, or not an image)")
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed:
        try:
            dec = get_decoder(ts)
        except NotImplementedError as e:
            raise ValueError(f"{path}: transfer syntax {ts} is not supported by pydicom") from e
        if not dec.is_available:
            raise _codec_error(path, ts, dec.missing_dependencies)
    try:
        arr = ds.pixel_array
    except RuntimeError as e:
        if "Unable to decompress" in str(e):
            raise _codec_error(path, ts, []) from e
        raise ValueError(f"{path}: cannot decode PixelData ({e}); truncated or corrupt?") from e
    except Exception as e:
        raise ValueError(f"{path}: cannot decode PixelData ({e}); truncated or corrupt?") from e
    n = int(ds.get("NumberOfFrames") or 1)
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        return arr.reshape(n, ds.Rows, ds.Columns, -1)
    arr = arr.reshape(n, ds.Rows, ds.Columns)
    if "PerFrameFunctionalGroupsSequence" not in ds or "RescaleSlope" in ds:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    out = arr.astype(np.float32)
    for i in range(n):
        slope = _fg(ds, i, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _fg(ds, i, "PixelValueTransformationSequence", "RescaleIntercept")
        out[i] = out[i] * float(1.0 if slope is None else slope) + float(inter or 0.0)
    return out


def _resolve(path, series_uid: str | None) -> tuple[list[Path], str]:
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
    listing = "; ".join(
        f"{s.series_uid} ({s.modality} '{s.description}', {s.n_slices})" for s in series
    )
    if series_uid is not None:
        hit = [s for s in series if s.series_uid == series_uid]
        if not hit:
            raise ValueError(f"{p}: no series {series_uid}; found: {listing or 'no image series'}")
        return [Path(f) for f in hit[0].files], str(p)
    if not series:
        raise ValueError(f"{p}: no DICOM image series found (SEG/RTSTRUCT/non-DICOM are skipped)")
    if len(series) > 1:
        raise ValueError(f"{p}: holds {len(series)} series; pass series_uid= one of: {listing}")
    return [Path(f) for f in series[0].files], str(p)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.2f}" for x in v) + ")"


def _first(v) -> float:
    """The first value of a possibly multi-valued DS element (WindowCenter: [40, 300] -> 40.0)."""
    return float(v[0]) if hasattr(v, "__getitem__") and not isinstance(v, str) else float(v)


def _slice_step(d: np.ndarray, ipps: np.ndarray, source: str) -> float:
    """Median spacing (mm) of sorted positions `d` along the normal; gaps/duplicates raise."""
    steps = np.diff(d)
    dup = np.nonzero(steps < 1e-3)[0]
    if dup.size:
        k = dup[0]
        raise ValueError(
            f"{source}: duplicate slice positions: {dup.size + 1}+ slices at {_fmt(ipps[k])} (LPS mm);"
            " several acquisitions/echoes in one series? Split it or remove the duplicates"
        )
    med = float(np.median(steps))
    bad = np.nonzero((steps > 1.5 * med) | (steps < med / 1.5))[0]
    if bad.size:
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
    meta: modality, series_uid, study_uid, sop_instance_uids and positions (LPS mm) in z order,
    frame_of_reference_uid, window (center, width) or None, source, description, files.
    """
    files, source = _resolve(path, series_uid)
    dsets = [(f, _read(f)) for f in files]
    uids = {str(ds.get("SeriesInstanceUID", "")) for _, ds in dsets}
    if len(uids) > 1:
        raise ValueError(
            f"{source}: files from {len(uids)} series: {sorted(uids)}; pass one series"
        )
    frames = []  # (file, ds, frame index, iop, ipp, pixel spacing)
    for f, ds in dsets:
        n = int(ds.get("NumberOfFrames") or 1)
        if n > 1 and len(dsets) > 1:
            raise ValueError(
                f"{f}: multi-frame file ({n} frames) mixed with other files; read it alone"
            )
        for i in range(n):
            iop = _fg(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")
            ipp = _fg(ds, i, "PlanePositionSequence", "ImagePositionPatient")
            ps = _fg(ds, i, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
            frames.append((f, ds, i, iop, ipp, ps))
    f0, ds0 = dsets[0]
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in dsets if "Rows" in ds}
    if len(shapes) != 1:
        raise ValueError(f"{source}: slices differ in size (Rows, Columns): {sorted(shapes)}")
    known = all(fr[3] is not None and fr[4] is not None for fr in frames)
    if not known and len(dsets) > 1:
        bad = next(fr for fr in frames if fr[3] is None or fr[4] is None)
        raise ValueError(f"{bad[0]}: no ImagePositionPatient/ImageOrientationPatient; cannot sort")
    iops = np.array([fr[3] if known else [1, 0, 0, 0, 1, 0] for fr in frames], dtype=float)
    k = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
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
    if len(frames) > 1 and known:
        dz = _slice_step(ipps @ normal, ipps, source)
    else:
        dz = float(ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0)
    ps = frames[0][5]
    dy, dx = (float(ps[0]), float(ps[1])) if ps else (1.0, 1.0)
    cache: dict[Path, np.ndarray] = {}
    planes = []
    for f, ds, i, *_ in frames:
        if f not in cache:
            cache[f] = _pixels(ds, f)
        planes.append(cache[f][i])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, normal * dz, ipps[0]
    wc, ww = ds0.get("WindowCenter"), ds0.get("WindowWidth")
    meta = {
        "modality": str(ds0.get("Modality", "")),
        "series_uid": str(ds0.get("SeriesInstanceUID", "")),
        "study_uid": str(ds0.get("StudyInstanceUID", "")),
        "sop_instance_uids": [str(fr[1].get("SOPInstanceUID", "")) for fr in frames],
        "positions": [[float(v) for v in p] for p in ipps],
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "")),
        "window": (_first(wc), _first(ww)) if wc is not None and ww is not None else None,
        "source": source,
        "description": str(ds0.get("SeriesDescription", "")),
        "files": [str(fr[0]) for fr in frames],
        "spacing_known": bool(ps) and known,
    }
    return Volume(np.stack(planes), (dz, dy, dx), LPS_TO_RAS @ lps, meta)
