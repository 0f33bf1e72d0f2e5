"""Export predicted masks: NIfTI on a reference volume's grid, or a DICOM-SEG on the source series.

Masks are (Z, Y, X) arrays in the reference's voxel grid (the `Volume` contract of
``medbank.io.volume``): bool (one structure) or non-negative integer labels (0 = background).
Files are written atomically (temporary sibling, renamed on success): a failure leaves no file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import numpy as np

from samed2_kit.medbank.io.labels import to_label_array
from samed2_kit.medbank.io.volume import Volume
from samed2_kit.utils.atomic import atomic_path

# Type 2 attributes highdicom copies from the source; anonymised files sometimes drop them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber")
_TYPE2 += ("StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
_NO_SOURCE = (
    "DICOM-SEG needs the source DICOM series: pass the series folder the volume was read from"
)


def _label_map(mask, shape: tuple[int, ...], where: str) -> np.ndarray:
    """`mask` as a (Z, Y, X) non-negative integer array; wrong shape/values raise ValueError."""
    arr = np.asarray(mask)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{where}: mask shape {arr.shape} differs from the reference's (Z, Y, X) {tuple(shape)}"
            ": predict on that volume's grid (or resample the mask to it) before exporting"
        )
    arr = to_label_array(arr, "mask")  # bool -> uint8; floats must be whole numbers
    if arr.size and arr.min() < 0:
        raise ValueError(f"{where}: mask holds negative values ({arr.min()}); labels must be >= 0")
    return arr


def _sidecar(path: Path) -> Path:
    """``<stem>.labels.json`` next to a ``.nii``/``.nii.gz`` file."""
    stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".gz") else path.stem
    return path.with_name(f"{stem}.labels.json")


def write_nifti(mask, reference: Volume, path, labels: dict[int, str] | None = None) -> Path:
    """Write a (Z, Y, X) mask on `reference`'s grid as NIfTI with exactly the reference's affine.

    Args:
        mask: (Z, Y, X) bool or non-negative integer labels; shape must equal
            ``reference.shape_zyx``. An all-zero mask is valid (an empty result).
        reference: the volume the mask was predicted on; its affine (voxel (x, y, z) -> RAS+ mm)
            is stored as sform and qform (code 1, scanner), units mm.
        path: ``.nii`` or ``.nii.gz`` (gzip-compressed) destination.
        labels: optional {label value: name}; written as a JSON sidecar ``<stem>.labels.json``
            (``{"1": "liver"}``, readable by ``medbank.io.labels.load_label_names``).

    Returns the path. Data are uint8 (max label <= 255) or uint16 (<= 65535), stored (X, Y, Z).

    Raises:
        ValueError: wrong extension, mask shape or values, labels > 65535, or a reference
            without geometry (affine not finite or singular).
    """
    import nibabel as nib

    path = Path(path)
    low = path.name.lower()
    if not low.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name must end in .nii or .nii.gz")
    src = reference.meta.get("source", "reference volume")
    aff = np.asarray(reference.affine, dtype=float)
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise ValueError(
            f"{src}: volume without geometry (affine not finite or singular: "
            f"{np.round(aff, 4).tolist()}); use a reference read from an image file with a valid "
            "affine (NIfTI/NRRD/DICOM) or set reference.affine"
        )
    arr = _label_map(mask, reference.shape_zyx, str(path))
    top = int(arr.max()) if arr.size else 0
    if top > 65535:
        raise ValueError(f"{path}: label {top} does not fit uint16; renumber labels to <= 65535")
    data = arr.astype(np.uint8 if top <= 255 else np.uint16).transpose(2, 1, 0)
    img = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)  # nearest rigid approximation; readers use the sform (code > 0)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    side = atomic_path(_sidecar(path)) if labels else contextlib.nullcontext()
    with atomic_path(path) as tmp, side as tmp_json:  # sidecar renamed first, then the image
        with open(tmp, "wb") as fh:
            if low.endswith(".gz"):
                with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=6, mtime=0) as gz:
                    img.to_stream(gz)
            else:
                img.to_stream(fh)
        if labels:
            names = {str(int(k)): str(v) for k, v in sorted(labels.items())}
            tmp_json.write_text(json.dumps(names, indent=1) + "\n")
    return path


def _source_datasets(
    source, mask_shape, series_uid: str | None = None
) -> tuple[list, np.ndarray, str]:
    """Headers of the source series, sorted like ``read_dicom_series`` (position along the slice
    normal), the permutation to apply to the mask's slices for highdicom, and a name for messages.

    For single-frame files the returned datasets are in z order (permutation = identity); for one
    multi-frame file the mask is permuted from z order to the file's frame order.
    """
    import pydicom

    from samed2_kit.medbank.io import _format_of
    from samed2_kit.medbank.io.dicom import _fg, _resolve

    expected = None
    if isinstance(source, Volume):
        if not source.meta.get("files"):
            raise ValueError(f"{source.meta.get('source', 'source volume')}: {_NO_SOURCE}")
        expected, source = source.meta.get("positions"), source.meta["files"]
    if not isinstance(source, (list, tuple)) and Path(source).is_file():
        if _format_of(Path(source)) != "dicom":
            raise ValueError(f"{source}: not a DICOM file; {_NO_SOURCE}")
    files, name = _resolve(source, series_uid)
    dsets = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in files]
    counts = [int(ds.get("NumberOfFrames") or 1) for ds in dsets]
    if len(dsets) > 1 and max(counts) > 1:
        raise ValueError(f"{name}: multi-frame files mixed with others; pass one series")
    frames = [(ds, i) for ds, n in zip(dsets, counts, strict=True) for i in range(n)]
    shape = (len(frames), int(dsets[0].Rows), int(dsets[0].Columns))
    if tuple(mask_shape) != shape:
        raise ValueError(
            f"{name}: mask shape {tuple(mask_shape)} differs from the source series' (Z, Y, X) "
            f"{shape}: predict on read_dicom_series({name!r}) (or resample the mask to it)"
        )
    ipp = [_fg(ds, i, "PlanePositionSequence", "ImagePositionPatient") for ds, i in frames]
    iop = _fg(dsets[0], 0, "PlaneOrientationSequence", "ImageOrientationPatient")
    if len(frames) > 1 and (iop is None or any(p is None for p in ipp)):
        raise ValueError(f"{name}: slices lack ImagePositionPatient/ImageOrientationPatient")
    order = np.zeros(1, dtype=int)
    if len(frames) > 1:
        pos = np.asarray(ipp, dtype=float)
        iop = np.asarray(iop, dtype=float)
        order = np.argsort(pos @ np.cross(iop[:3], iop[3:]), kind="stable")  # as the reader
        if np.any(np.diff(pos[order] @ np.cross(iop[:3], iop[3:])) < 1e-3):
            raise ValueError(f"{name}: duplicate slice positions; pass a single stack")
        if expected is not None and not np.allclose(pos[order], expected, atol=1e-3):
            raise ValueError(
                f"{name}: the files' ImagePositionPatient order differs from the volume's "
                "meta['positions']: pass the series folder instead of the volume"
            )
    for ds in dsets:
        for attr in _TYPE2:
            if attr not in ds:
                setattr(ds, attr, None)  # empty value, as a conformant file would hold
    if len(dsets) == 1:
        return dsets, np.argsort(order), name  # file frame i holds z-sorted slice rank(i)
    return [dsets[j] for j in order], np.arange(len(dsets)), name


def _segment_pixels(
    arr: np.ndarray, labels: dict[int, str], perm: np.ndarray, path: Path
) -> tuple[list[int], np.ndarray]:
    """(label values with a segment, ascending; (Z, Y, X) segment numbers 1..K in the source's
    frame order, uint8 or uint16); an all-zero mask without `labels` raises ValueError."""
    values = sorted({int(v) for v in np.unique(arr) if v > 0} | set(labels))
    if not values:
        raise ValueError(
            f"{path}: the mask is all zero and no labels were given: a DICOM-SEG needs at least "
            "one segment; pass labels={1: 'name'} to write an empty named segment, or skip it"
        )
    lut = np.zeros(max(values) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    return values, lut[arr][perm]  # label values -> segment numbers 1..K, in frame order


def _segment_descriptions(
    values: list[int], labels: dict[int, str], algorithm: str, version: str, category, prop
) -> list:
    """One highdicom SegmentDescription per label value (segment numbers 1..K, AUTOMATIC)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    alg = hd.AlgorithmIdentificationSequence(
        name=algorithm, family=codes.cid7162.ArtificialIntelligence, version=version
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=labels.get(v, f"segment {v}"),
            segmented_property_category=category or codes.SCT.Tissue,
            segmented_property_type=prop or codes.SCT.Tissue,
            algorithm_type="AUTOMATIC",
            algorithm_identification=alg,
        )
        for n, v in enumerate(values, start=1)
    ]


def _segmentation(
    dsets: list,
    pixels: np.ndarray,
    descriptions: list,
    name: str,
    algorithm: str,
    version: str,
    series_description: str | None,
):
    """The highdicom BINARY Segmentation of (Z, Y, X) segment numbers `pixels` on `dsets`."""
    import highdicom as hd

    try:
        return hd.seg.Segmentation(
            source_images=dsets,
            pixel_array=pixels,
            segmentation_type="BINARY",
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=300,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="samed2-kit",
            manufacturer_model_name=algorithm,
            software_versions=version,
            device_serial_number="1",
            omit_empty_frames=bool(pixels.any()),  # all empty: keep frames rather than none
            series_description=series_description or f"{algorithm} segmentation",
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot build a DICOM-SEG from this series ({e})") from e


def write_dicom_seg(
    mask,
    source,
    path,
    labels: dict[int, str] | None = None,
    algorithm: str = "samed2-kit",
    version: str | None = None,
    category=None,
    property_type=None,
    series_description: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """Write a (Z, Y, X) mask as a BINARY DICOM Segmentation (highdicom) referencing its source.

    Args:
        mask: (Z, Y, X) bool or non-negative integer labels in ``read_dicom_series(source)``'s
            slice order (sorted by position along the slice normal; the files are re-sorted the
            same way here, so mask slice k refers to the SOP instance at that position).
        source: the DICOM series the mask was predicted on: a folder (one series), a list of
            files, one (multi-frame) file, or the `Volume` read from it (uses meta["files"]).
        path: destination file (e.g. ``pred.dcm``).
        labels: optional {label value: name}. One segment per non-zero label value present in
            the mask or named here (a named, absent label gives an empty segment); segment
            numbers run 1..K in ascending label value (equal to the values when those are 1..K).
            SegmentLabel = the name, default "segment N" (N = label value).
        algorithm, version: AlgorithmIdentificationSequence name/version (family: DCM
            "Artificial Intelligence"), also ManufacturerModelName/SoftwareVersions;
            version defaults to samed2_kit.__version__. Manufacturer is "samed2-kit".
        category, property_type: segmented property codes for every segment (pydicom ``Code``
            or highdicom ``CodedConcept``); default SCT 85756007 "Tissue" for both.
        series_description: default "<algorithm> segmentation".
        series_uid: pick the series when the `source` folder holds several.

    Empty frames are omitted; an all-zero mask with `labels` writes empty named segments (all
    frames stored, empty); an all-zero mask without `labels` is a ValueError (no segment).

    Raises:
        ValueError: mask shape ≠ the series' (Z, Y, X), bad mask values, no DICOM source.
    """
    import highdicom  # noqa: F401  (optional dependency: fail before reading the series)

    import samed2_kit

    path = Path(path)
    labels = {int(k): str(v) for k, v in (labels or {}).items() if int(k) > 0}
    arr = np.asarray(mask)
    dsets, perm, name = _source_datasets(source, arr.shape, series_uid)
    arr = _label_map(arr, arr.shape, str(path))
    values, pixels = _segment_pixels(arr, labels, perm, path)
    version = version or samed2_kit.__version__
    descriptions = _segment_descriptions(
        values, labels, algorithm, version, category, property_type
    )
    seg = _segmentation(dsets, pixels, descriptions, name, algorithm, version, series_description)
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return path
