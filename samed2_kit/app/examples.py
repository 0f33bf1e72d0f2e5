"""Save a segmented input as a training example: a folder of medbank sources plus `spec.yaml`.

Layout of an examples folder (roots relative to `spec.yaml`; `samed2 medbank build
FOLDER/spec.yaml --out STORE` builds it):

    images/<id>.png, masks/<id>.png            source <folder>_2d     (pixel size unknown)
    images_mm/<id>.png, masks_mm/<id>.png      source <folder>_2d_mm  (pixel_size.csv, mm)
    volumes/<id>_image.nii.gz, <id>_label.nii.gz   source <folder>_3d (volumes with geometry)

A source is listed only once it holds files. The first source listed is the others' `case_from`,
and repeats of one input are saved as `<id>__2`, `<id>__3`... with the case regex dropping that
suffix, so every save of one input (and a slice saved from a saved volume) lands in one split.
The 2D sources read the PNGs as stored (`intensity: as_is`): non-8-bit images are scaled to 8 bits
here by the modality's rule (CT window, MR/PET percentiles, others min-max) over the whole volume.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samed2_kit.app.files import Opened
from samed2_kit.medbank.spec import MODALITIES

SPEC = "spec.yaml"
CSV = "pixel_size.csv"
_LOCK = ".samed2-examples.lock"
_CASE = r"^(.+?)(?:__\d+)?$"  # group 1: the id without a `__N` repeat suffix
_HEADER = (
    "# Training examples saved by the samed2 app (save as training example); roots are relative\n"
    "# to this file. Build a store: samed2 medbank build {spec} --out STORE\n"
)


@dataclass
class ExampleSpec:
    """What a folder of examples is: medbank `modality` (one of MODALITIES), `task` (letters,
    digits, `_`, `-`; also the label name of every mask) and `licence` of the images."""

    modality: str
    task: str
    licence: str

    def __post_init__(self) -> None:
        self.modality, self.task = str(self.modality).strip(), str(self.task).strip()
        self.licence = str(self.licence).strip()
        if self.modality not in MODALITIES:
            raise ValueError(f"modality {self.modality!r}: choose one of {', '.join(MODALITIES)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.task):
            raise ValueError(
                f"task {self.task!r}: give a name of letters, digits, _ and - (e.g. fetal_head)"
            )
        if not self.licence:
            raise ValueError(
                "licence is empty: give the images' licence (e.g. CC-BY-4.0, internal)"
            )


def _safe(name: str, default: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or default


def read_example_spec(folder) -> ExampleSpec | None:
    """The modality, task and licence recorded in `folder/spec.yaml` (its first source), or None
    when there is no spec yet. ValueError naming the file when it is not a readable spec."""
    import yaml

    path = Path(folder) / SPEC
    if not path.is_file():
        return None
    try:
        src = (yaml.safe_load(path.read_text()) or {})["sources"][0]
        return ExampleSpec(src["modality"], src["task"], src["licence"])
    except (yaml.YAMLError, KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path}: not a samed2 examples spec ({type(e).__name__}: {e}); fix it, or choose "
            "another folder"
        ) from e


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on `folder` (two sessions saving at once); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(folder / _LOCK, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _paths(folder: Path, ident: str) -> dict[str, Path]:
    return {
        "2d": folder / "images" / f"{ident}.png",
        "2d_m": folder / "masks" / f"{ident}.png",
        "2d_mm": folder / "images_mm" / f"{ident}.png",
        "2d_mm_m": folder / "masks_mm" / f"{ident}.png",
        "3d": folder / "volumes" / f"{ident}_image.nii.gz",
        "3d_m": folder / "volumes" / f"{ident}_label.nii.gz",
    }


def _new_id(folder: Path, name: str) -> str:
    base = _safe(name, "example")
    ident, k = base, 1
    while any(p.exists() for p in _paths(folder, ident).values()):
        k += 1
        ident = f"{base}__{k}"
    return ident


def _to_8bit(vol, modality: str) -> np.ndarray:
    """(Z, Y, X[, 3]) as stored when uint8/uint16, else 8 bits by `modality`'s medbank rule."""
    from samed2_kit.medbank.preprocess import volume_to_uint8
    from samed2_kit.medbank.spec import IntensitySpec

    arr = vol.array
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    return volume_to_uint8(arr, modality if arr.ndim == 3 else "other", IntensitySpec())


def _write_png(arr: np.ndarray, path: Path) -> None:
    """(H, W) uint8/uint16 or (H, W, 3) uint8 as a PNG, atomically."""
    from PIL import Image

    from samed2_kit.utils.atomic import atomic_path

    if arr.ndim == 3 and arr.dtype != np.uint8:
        arr = (arr / 257).round().astype(np.uint8)  # 16-bit colour: PIL writes 8-bit RGB only
    img = Image.fromarray(np.ascontiguousarray(arr))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def _write_image_nifti(vol, path: Path) -> None:
    """The volume's (Z, Y, X) array as NIfTI with its affine: int16 when whole numbers that fit,
    else float32; gzip-compressed, written atomically."""
    import gzip

    import nibabel as nib

    from samed2_kit.utils.atomic import atomic_path

    arr = np.asarray(vol.array)
    whole = np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr))
    fits = whole and arr.size and -32768 <= arr.min() and arr.max() <= 32767
    data = arr.astype(np.int16 if fits else np.float32).transpose(2, 1, 0)
    aff = np.asarray(vol.affine, dtype=float)
    img = nib.Nifti1Image(np.ascontiguousarray(data), aff)
    img.set_sform(aff, code=1)
    img.set_qform(aff, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=6, mtime=0) as gz:
            img.to_stream(gz)


def _csv_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()[1:] if path.is_file() else []


def _spec_text(folder: Path, spec: ExampleSpec) -> str:
    """spec.yaml for what `folder` holds now; keeps the user's top-level keys and source keys."""
    import yaml

    old = yaml.safe_load((folder / SPEC).read_text()) if (folder / SPEC).is_file() else {}
    base = _safe(folder.resolve().name, "examples")
    old_src = {s.get("name"): s for s in old.get("sources", []) if isinstance(s, dict)}
    wanted = [  # (source suffix, folder that must hold files, keys)
        ("3d", "volumes", {"layout": "volumes", "image": "volumes/{id}_image.nii.gz",
                           "mask": "volumes/{id}_label.nii.gz", "labels": {1: spec.task}}),
        ("2d_mm", "images_mm", {"layout": "pairs", "image": "images_mm/{id}.png",
                                "mask": "masks_mm/{id}.png", "spacing_csv": CSV,
                                "intensity": {"mode": "as_is"}}),
        ("2d", "images", {"layout": "pairs", "image": "images/{id}.png",
                          "mask": "masks/{id}.png", "intensity": {"mode": "as_is"}}),
    ]  # fmt: skip
    sources = []
    for suffix, sub, keys in wanted:
        d = folder / sub
        if not d.is_dir() or not any(not p.name.startswith(".") for p in d.iterdir()):
            continue
        name = f"{base}_{suffix}"
        src = {**old_src.get(name, {}), "name": name, "root": ".", **keys, "case": _CASE}
        src.update(modality=spec.modality, task=spec.task, licence=spec.licence)
        src.pop("case_from", None)
        if sources:
            src["case_from"] = sources[0]["name"]
        sources.append(src)
    top = {"name": base, "split": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 0}
    top.update({k: v for k, v in old.items() if k != "sources"})
    body = yaml.safe_dump({**top, "sources": sources}, sort_keys=False, default_flow_style=None)
    return _HEADER.format(spec=folder / SPEC) + body


def _check_folder(folder: Path, spec: ExampleSpec) -> None:
    """ValueError unless `folder` is new, empty, or holds examples of `spec` (its spec.yaml)."""
    others = [p.name for p in folder.iterdir() if p.name != _LOCK]
    if others and not (folder / SPEC).is_file():
        raise ValueError(
            f"{folder} holds files ({', '.join(sorted(others)[:3])}...) but no {SPEC}: choose a "
            "new or empty folder, or one the app saved examples in"
        )
    recorded = read_example_spec(folder)
    if recorded is not None and recorded != spec:
        raise ValueError(
            f"{folder} holds examples of modality {recorded.modality!r}, task {recorded.task!r}, "
            f"licence {recorded.licence!r} (its {SPEC}); you gave {spec.modality!r}, "
            f"{spec.task!r}, {spec.licence!r}: choose another folder for these, or use the "
            "recorded values"
        )


def _mask_2d(mask: np.ndarray, opened: Opened, slice_index: int | None) -> tuple[np.ndarray, int]:
    """The (H, W) bool mask to save and its slice index."""
    z = 0 if slice_index is None else int(slice_index)
    zyx = opened.volume.shape_zyx
    if not 0 <= z < zyx[0]:
        raise ValueError(f"slice_index={slice_index}: {opened.name} has slices 0..{zyx[0] - 1}")
    if mask.shape == zyx:
        return mask[z], z
    if mask.shape in (zyx[1:], (1, *zyx[1:])):
        return mask.reshape(zyx[1:]), z
    raise ValueError(f"mask shape {mask.shape} differs from {opened.name}'s (Z, H, W) {zyx}")


def save_example(
    folder, opened: Opened, mask, spec: ExampleSpec, slice_index: int | None = None
) -> Path:
    """Save `opened` with `mask` into the examples folder `folder` (layout: module docstring).

    Args:
        folder: the examples folder (created; a non-empty folder without spec.yaml is refused).
        opened: the input, from ``files.open_input``.
        mask: (Z, H, W) bool (non-zero = object) on `opened.volume`'s grid (Z = 1 for an image).
        spec: modality/task/licence; must equal those recorded in `folder/spec.yaml` (the first
            save records them; `read_example_spec` reads them back).
        slice_index: save slice z of a volume as a 2D example (mask (Z, H, W), or (H, W) of
            that slice). Needed for volumes without geometry.

    Returns the path of the saved mask file. Images go to PNG (8-bit grey/RGB or 16-bit grey as
    read, other types scaled to 8 bits), volumes to NIfTI with the volume's affine. Every file is
    written atomically and spec.yaml last; on any failure the files of this save are removed and
    the CSV restored, so the folder is left as it was.

    Raises:
        ValueError: an empty mask (medbank keeps only slices whose mask has >= min_area pixels,
            ``cases.slice_case``: an empty mask would add nothing to the store), a shape
            mismatch, a volume without geometry or in colour (save a slice), or a folder whose
            spec records other values.
    """
    from samed2_kit.utils.atomic import write_text

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file: choose a folder for the training examples")
    mask = np.asarray(mask) != 0
    vol = opened.volume
    two_d = slice_index is not None or vol.shape_zyx[0] == 1
    if two_d:
        mask, z = _mask_2d(mask, opened, slice_index)
    elif mask.shape != vol.shape_zyx:
        raise ValueError(f"mask shape {mask.shape} differs from {opened.name}'s (Z, H, W) "
                         f"{vol.shape_zyx}: give the mask on the opened volume's grid")  # fmt: skip
    if not mask.any():
        raise ValueError("the mask is empty: segment the object before saving")
    if not two_d and (not opened.geometry or vol.array.ndim != 3):
        why = "has no geometry" if not opened.geometry else "is in colour"
        raise ValueError(
            f"{opened.name} {why}, so it cannot be saved as a 3D example: save a slice as a 2D "
            "example instead (save_example(..., slice_index=z))"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        _check_folder(folder, spec)
        ident = _new_id(folder, opened.name)
        paths = _paths(folder, ident)
        csv_path = folder / CSV
        csv_old = csv_path.read_text() if csv_path.is_file() else None
        made = [d for d in {p.parent for p in paths.values()} if not d.exists()]
        written: list[Path] = []
        try:
            if two_d:
                mm = bool(vol.meta.get("spacing_known", True)) and opened.geometry
                key = "2d_mm" if mm else "2d"
                image = _to_8bit(vol, spec.modality)[z]
                for k, arr in ((key, image), (f"{key}_m", mask.astype(np.uint8) * 255)):
                    written.append(paths[k])
                    _write_png(arr, paths[k])
                if mm:  # medbank's CSV is isotropic: the row spacing (y) in mm per pixel
                    written.append(csv_path)
                    rows = [*_csv_rows(csv_path), f"{ident}.png,{float(vol.spacing[1])!r}"]
                    write_text(csv_path, "\n".join(["filename,pixel size(mm)", *rows]) + "\n")
                out = paths[f"{key}_m"]
            else:
                from samed2_kit.export import write_nifti

                written.append(paths["3d"])
                _write_image_nifti(vol, paths["3d"])
                written.append(paths["3d_m"])
                out = write_nifti(mask, vol, paths["3d_m"])
            _write_spec(folder, spec)  # last; atomic: a failure keeps the previous spec
        except BaseException:
            for p in written:
                p.unlink(missing_ok=True)
            if csv_path in written and csv_old is not None:
                write_text(csv_path, csv_old)
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
    return out


def _write_spec(folder: Path, spec: ExampleSpec) -> None:
    """Write spec.yaml atomically, checked by medbank's `load_spec` before it replaces the old."""
    from samed2_kit.medbank.spec import load_spec
    from samed2_kit.utils.atomic import atomic_path

    text = _spec_text(folder, spec)
    with atomic_path(folder / SPEC) as tmp:
        tmp.write_text(text)
        load_spec(tmp)
