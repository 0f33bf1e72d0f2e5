"""Open what a user uploads or picks from `--data`: images, volumes, DICOM folders and zips.

No GUI here: `open_input` turns a path into an `Opened` (a medbank `Volume` plus what the page
shows), `data_entries` lists the openable entries of a `--data` folder and `resolve_data` maps an
entry back to a path without ever leaving that folder. Every reading failure is a ValueError whose
message starts with the file's name and says what samed2 opens.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from samed2_kit.medbank.io.volume import Volume

MAX_UPLOAD_MB = 512  # the largest upload the app accepts (passed to Gradio)
MAX_ZIP_FILES = 5000  # files in one uploaded .zip
MAX_ZIP_MB = 2048  # uncompressed size of one uploaded .zip
MAX_ENTRIES = 2000  # entries `data_entries` lists
SUPPORTED = "samed2 opens PNG/JPEG/TIFF/BMP images, NIfTI, NRRD, NPZ, DICOM files, folders or .zip"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Opened:
    """An input opened for the app.

    volume: the medbank Volume, array (Z, Y, X) or (Z, Y, X, 3), spacing (z, y, x) mm.
    name: short display/id stem ("000_HC", "hippocampus_001", the DICOM folder or zip stem).
    kind: "image" (Z == 1) or "volume".
    fmt: "image", "nifti", "nrrd", "npz" or "dicom" (as ``medbank.io._format_of``).
    source: the file or DICOM folder actually read (for a zip: the extracted folder).
    geometry: True when the voxel size is known and the affine is finite and invertible (NIfTI
        export and volumes in ml need it); False for plain 2D images and geometry-less stacks.
    notes: lines for the page (missing geometry, which DICOM series was read, ...).
    """

    volume: Volume
    name: str
    kind: str
    fmt: str
    source: Path
    geometry: bool
    notes: list[str] = field(default_factory=list)


class SeriesChoice(ValueError):
    """A DICOM folder or zip holds several image series: pick one and call `open_input` again.

    path: the folder or zip given to `open_input` (pass it back with `series_uid=`).
    series: [(SeriesInstanceUID, label such as "CT 'abdomen' 40 slices")].
    """

    def __init__(self, path: Path, series: list[tuple[str, str]]):
        self.path = Path(path)
        self.series = series
        listed = "; ".join(f"{uid} ({label})" for uid, label in series)
        super().__init__(
            f"{self.path.name} holds {len(series)} DICOM image series: pick one ({listed})"
        )


class _Clear(ValueError):
    """A failure whose message is complete (names the file and the fix): shown as is."""


def has_geometry(volume: Volume) -> bool:
    """Whether `volume` has a usable geometry: voxel size known (meta "spacing_known", absent =
    known, as NIfTI) and a finite, invertible (4, 4) affine."""
    aff = np.asarray(volume.affine, dtype=float)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        return False
    return bool(volume.meta.get("spacing_known", True)) and abs(np.linalg.det(aff[:3, :3])) > 1e-9


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".zip", ".dcm", *_IMAGE_EXTS, ".nii", ".nrrd", ".nhdr", ".npz"):
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return name


def _label(info) -> str:
    return f"{info.modality or '?'} '{info.description}' {info.n_slices} slices"


def _open_dicom_folder(folder: Path, shown: Path, series_uid: str | None):
    """(Volume, notes) of one image series under `folder`; `shown` is what the user gave."""
    from samed2_kit.medbank.io.dicom import find_series, read_dicom_series

    series = find_series(folder)
    if not series:
        raise _Clear(
            f"{shown.name}: holds no DICOM image series (SEG, RT and non-DICOM files are "
            f"skipped). {SUPPORTED}"
        )
    if series_uid is None and len(series) > 1:
        raise SeriesChoice(shown, [(s.series_uid, _label(s)) for s in series])
    hit = [s for s in series if series_uid in (None, s.series_uid)]
    if not hit:
        uids = ", ".join(s.series_uid for s in series)
        raise _Clear(
            f"{shown.name}: no series {series_uid!r} here; its series are: {uids} "
            "(pick one of them)"
        )
    vol = read_dicom_series([Path(f) for f in hit[0].files])
    vol.meta["source"] = str(folder)
    where = f" of {len(series)} (pick another above)" if len(series) > 1 else ""
    return vol, [f"series {hit[0].series_uid}{where}: {_label(hit[0])}"]


def _member_path(zip_name: str, name: str) -> PurePosixPath:
    """The relative path of a zip member; absolute paths and `..` are a _Clear error."""
    norm = name.replace("\\", "/")
    rel = PurePosixPath(norm)
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in rel.parts:
        raise _Clear(
            f"{zip_name}: member {name!r} points outside the zip's folder (absolute path or "
            "'..'); refused. Re-create the zip with relative paths (e.g. `zip -r series.zip dir`)"
        )
    return rel


def extract_zip(zpath: Path, workdir: Path) -> Path:
    """Extract the zip `zpath` safely into a folder under `workdir` and return that folder.

    Refused (_Clear ValueError naming the zip): not a zip, no files, members with absolute
    paths, `..` or symlinks, more than MAX_ZIP_FILES files or MAX_ZIP_MB MiB uncompressed.
    Hidden members and `__MACOSX/` are skipped. Extraction is atomic (a temporary folder renamed
    into place), so a second call for the same zip (path, size and mtime) reuses the folder.
    """
    import zipfile

    from samed2_kit.utils.atomic import atomic_path

    name, limit = zpath.name, MAX_ZIP_MB * 2**20
    try:
        zf = zipfile.ZipFile(zpath)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _Clear(f"{name}: not a readable .zip ({e}). {SUPPORTED}") from e
    with zf:
        members = []
        for info in zf.infolist():
            rel = _member_path(name, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise _Clear(f"{name}: member {info.filename!r} is a symlink; refused (zip files)")
            if not info.is_dir():
                members.append((rel, info))
        if not members:
            raise _Clear(f"{name}: the zip is empty; zip the DICOM files of a series. {SUPPORTED}")
        if len(members) > MAX_ZIP_FILES:
            raise _Clear(
                f"{name}: {len(members)} files, more than the limit of {MAX_ZIP_FILES}; zip one "
                "series (or a few) at a time, or put the folder under --data"
            )
        if sum(i.file_size for _, i in members) > limit:
            raise _Clear(
                f"{name}: over {MAX_ZIP_MB} MB uncompressed (the limit); zip one series at a "
                "time, or put the folder under --data"
            )
        st = zpath.stat()
        key = hashlib.sha1(f"{zpath.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        dest = Path(workdir) / f"{_stem(zpath)}-{key[:10]}"
        if dest.is_dir():
            return dest
        written = 0
        with atomic_path(dest, directory=True) as tmp:
            root = tmp.resolve()
            for rel, info in members:
                if rel.parts[0] == "__MACOSX" or any(p.startswith(".") for p in rel.parts):
                    continue
                target = (root / rel).resolve()
                if not target.is_relative_to(root):
                    raise _Clear(f"{name}: member {info.filename!r} points outside; refused")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > limit:
                            raise _Clear(f"{name}: over {MAX_ZIP_MB} MB uncompressed (the limit)")
                        dst.write(block)
    return dest


def _open(path: Path, series_uid: str | None, workdir) -> Opened:
    from samed2_kit.medbank.io import _format_of, read_volume

    if not path.exists():
        raise _Clear(f"{path.name}: no such file or folder ({path})")
    notes: list[str] = []
    source = path
    if path.is_file() and path.name.lower().endswith(".zip"):
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="samed2-app-")
        source = extract_zip(path, Path(workdir))
        vol, notes = _open_dicom_folder(source, path, series_uid)
        fmt = "dicom"
    elif path.is_dir():
        vol, notes = _open_dicom_folder(path, path, series_uid)
        fmt = "dicom"
    else:
        fmt = _format_of(path)
        if fmt is None:
            raise _Clear(f"{path.name}: not a file type samed2 reads. {SUPPORTED}")
        if series_uid is not None and fmt != "dicom":
            raise _Clear(f"{path.name}: series_uid applies to DICOM only and this is {fmt}")
        vol = read_volume(path, series_uid=series_uid)
    z = vol.array.shape[0]
    if vol.array.shape[1] < 1 or vol.array.shape[2] < 1 or z < 1:
        raise _Clear(f"{path.name}: empty image of shape {vol.array.shape}. {SUPPORTED}")
    geometry = has_geometry(vol)
    if z > 1 and not geometry:
        notes.append(
            f"no geometry in {path.name}: opened as a stack of 2D slices; NIfTI download and "
            "volume in ml unavailable"
        )
    elif z == 1 and not vol.meta.get("spacing_known", True):
        notes.append(f"no pixel size in {path.name}: lengths and areas are in pixels")
    kind = "image" if z == 1 else "volume"
    return Opened(vol, _stem(path), kind, fmt, source, geometry, notes)


def open_input(path, series_uid: str | None = None, workdir=None) -> Opened:
    """Open an image file, a volume file, a DICOM file/folder or a .zip of DICOM files.

    Args:
        path: .png/.jpg/.jpeg/.tif/.tiff/.bmp (any case), .nii/.nii.gz, .nrrd, .npz, a .dcm
            (or extension-less DICOM) file, a DICOM folder, or a .zip of DICOM files.
        series_uid: the DICOM series to read from a folder or zip that holds several.
        workdir: a folder the caller owns (a per-session temp folder) where zips are extracted;
            None: a new folder under the system temp folder (never removed).

    Returns:
        Opened (see its fields); the volume as read by ``medbank.io.read_volume``.

    Raises:
        SeriesChoice: a DICOM folder/zip holds several series and `series_uid` is None.
        ValueError: anything else (unreadable or unsupported file, unsafe or too large zip,
            unknown `series_uid`); the message starts with the file's name.
    """
    path = Path(path)
    try:
        return _open(path, series_uid, workdir)
    except SeriesChoice:
        raise
    except _Clear as e:
        raise ValueError(str(e)) from e
    except Exception as e:  # readers raise ValueError; anything else is wrapped the same way
        reason = str(e).replace(str(path), path.name) or type(e).__name__
        if workdir is not None:
            reason = reason.replace(str(workdir), "")
        kind = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
        raise ValueError(f"{path.name}: cannot open it ({kind}{reason}). {SUPPORTED}") from e


def _openable_suffixes() -> tuple[str, ...]:
    from samed2_kit.medbank.io import READERS

    exts = {s for r in READERS.values() for s in r.suffixes} | set(_IMAGE_EXTS) | {".zip"}
    return tuple(sorted(exts - {".dcm"}))


def _is_dicom_file(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    if "." in path.name:
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def data_entries(data_dir) -> list[str]:
    """The openable entries under `data_dir`: sorted relative POSIX paths of supported files
    (images, NIfTI, NRRD, NPZ, .zip) and of folders holding DICOM files (.dcm, or extension-less
    files with the DICOM preamble) as one entry each. Hidden files and folders are skipped, and
    so are links leading outside `data_dir`; at most MAX_ENTRIES (2000) entries."""
    root = Path(data_dir).resolve()
    exts = _openable_suffixes()
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        rel = here.relative_to(root)
        dicom = False
        for f in sorted(files):
            p = here / f
            if f.startswith(".") or not p.resolve().is_relative_to(root):
                continue
            if f.lower().endswith(exts):
                out.append((rel / f).as_posix())
            elif not dicom and _is_dicom_file(p):
                dicom = True
        if dicom:  # the folder is one entry ("." when it is `data_dir` itself)
            out.append(rel.as_posix())
        if len(out) >= MAX_ENTRIES:
            break
    return sorted(out)[:MAX_ENTRIES]


def resolve_data(data_dir, entry: str) -> Path:
    """`data_dir / entry`, resolved; ValueError ("outside --data") when `entry` is absolute, holds
    `..` or leads (through a symlink) outside `data_dir`, and when it does not exist."""
    root = Path(data_dir).resolve()
    rel = Path(str(entry))
    if rel.is_absolute() or ".." in rel.parts or str(entry).startswith(("/", "\\")):
        raise ValueError(f"{entry}: outside --data {root}; pick an entry from the list")
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{entry}: leads outside --data {root} (a link?); pick another entry")
    if not path.exists():
        raise ValueError(f"{entry}: does not exist under --data {root}; refresh the list")
    return path
