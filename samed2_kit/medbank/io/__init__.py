"""medbank.io: readers for image files, volumes and DICOM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_VOLUMES = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MedSAM npz (.npz), DICOM (a series folder, a "
    ".dcm file or an extension-less DICOM file), 2D images (.png, .jpg, .jpeg, .tif, .tiff, .bmp)"
)
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM")


def _format_of(path: Path) -> str | None:
    """Format name (nifti, nrrd, npz, dicom, image) or None: by extension, else by content."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    for reader in READERS.values():
        if reader.suffixes and name.endswith(reader.suffixes):
            return reader.name
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD"):
        return "nrrd"
    if head.startswith(b"PK\x03\x04"):
        return "npz"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        raise ValueError(
            f"{path} looks like a NIfTI file without a .nii/.nii.gz extension; rename it to "
            "end in .nii (or .nii.gz when gzip-compressed)"
        )
    if head.startswith(_IMAGE_MAGIC):
        return "image"
    return None


def _image_volume(path: Path, labels: bool):
    """A one-slice Volume (1, H, W) or (1, H, W, 3) from a 2D image file, spacing unknown."""
    import numpy as np

    from samed2_kit.medbank.io.image import read_image
    from samed2_kit.medbank.io.labels import to_label_array
    from samed2_kit.medbank.io.volume import Volume

    arr = read_image(path)
    if labels:
        if arr.ndim == 3:
            if not all(np.array_equal(arr[:, :, 0], arr[:, :, c]) for c in (1, 2)):
                raise ValueError(
                    f"label image {path} is colour with differing channels; a label map must "
                    "hold one integer id per pixel (save it as a grey PNG)"
                )
            arr = arr[:, :, 0]
        arr = to_label_array(arr, path)
    meta = {
        "source": str(path),
        "format": "image",
        "spacing_known": False,
        "dtype": str(arr.dtype),
        "is_label_map": bool(labels),
    }
    return Volume(np.ascontiguousarray(arr[None]), (1.0, 1.0, 1.0), meta=meta)


def read_volume(path, labels: bool = False, series_uid: str | None = None):
    """Read any supported volume or image file as a `Volume` (array (Z, Y, X), spacing (z, y, x)
    mm, affine voxel (x, y, z) -> RAS+ mm; see ``medbank.io.volume``).

    Dispatch: ``.nii``/``.nii.gz`` -> :func:`nifti.read_nifti`; ``.nrrd``/``.nhdr`` ->
    :func:`nrrd.read_nrrd`; ``.npz`` -> :func:`npz.read_npz` (the ``imgs`` volume, or ``gts`` with
    ``labels=True``); a folder or a ``.dcm`` file -> ``dicom.read_dicom_series``; 2D images ->
    a one-slice volume (1, H, W[, 3]) with spacing (1, 1, 1) and meta["spacing_known"] False.
    Other names are recognised by content (DICOM preamble, NRRD magic, zip, image magic).

    Args:
        path: file or DICOM series folder.
        labels: read a label map: integer array (NIfTI/NRRD/DICOM values must be whole numbers;
            an image is read raw, not thresholded, and RGB with equal channels gives one channel).
        series_uid: DICOM only: the SeriesInstanceUID to read from a folder holding several
            (spec key `series_uid`, `samed2 predict --series-uid`).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: unsupported format (lists the supported ones) or an unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (check the path)")
    fmt = _format_of(path)
    if fmt is None:
        raise ValueError(f"{path}: unsupported file type. Supported formats: {SUPPORTED_VOLUMES}")
    if series_uid is not None:
        if fmt != "dicom":
            raise ValueError(
                f"{path}: series_uid={series_uid!r} applies to DICOM only, and this is {fmt}; "
                "remove series_uid"
            )
        return _read_dicom(path, labels, series_uid)
    return READERS[fmt].read(path, labels)


def _read_nifti(path: Path, labels: bool):
    from samed2_kit.medbank.io.nifti import read_nifti

    return read_nifti(path, labels=labels)


def _read_nrrd(path: Path, labels: bool):
    from samed2_kit.medbank.io.nrrd import read_nrrd

    return read_nrrd(path, labels=labels)


def _read_npz(path: Path, labels: bool):
    from samed2_kit.medbank.io.npz import read_npz

    image, gts = read_npz(path)
    if not labels:
        return image
    if gts is None:
        raise ValueError(f"{path} has no 'gts' array, so no label map (keys {image.meta['keys']})")
    return gts


def _read_dicom(path: Path, labels: bool, series_uid: str | None = None):
    from samed2_kit.medbank.io.dicom import read_dicom_series

    vol = read_dicom_series(path, series_uid)
    if labels:
        from samed2_kit.medbank.io.labels import to_label_array

        vol.array = to_label_array(vol.array, path)
        vol.meta["is_label_map"] = True
    return vol


@dataclass(frozen=True)
class Reader:
    """A volume format: `read(path, labels) -> Volume`, and the file-name endings it claims
    (checked before the built-in content sniffing)."""

    name: str
    read: Callable[[Path, bool], object]
    suffixes: tuple[str, ...] = ()


# format name -> reader; `register_reader` adds one (docs/extending.md)
READERS: dict[str, Reader] = {
    "nifti": Reader("nifti", _read_nifti, (".nii", ".nii.gz")),
    "nrrd": Reader("nrrd", _read_nrrd, (".nrrd", ".nhdr")),
    "npz": Reader("npz", _read_npz, (".npz",)),
    "dicom": Reader("dicom", _read_dicom, (".dcm",)),
    "image": Reader("image", _image_volume, _IMAGE_EXTS),
}


def register_reader(reader: Reader, replace: bool = False) -> Reader:
    """Add a volume format to `read_volume` (and so to medbank sources and `samed2 predict`)."""
    if reader.name in READERS and not replace:
        raise ValueError(f"reader {reader.name!r} is already registered: pass replace=True")
    READERS[reader.name] = reader
    return reader
