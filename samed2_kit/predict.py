"""`samed2 predict`: an image or a volume + a prompts file -> mask files, no ground truth needed.

Prompts file (JSON), coordinates in pixels of the image / slice, x before y:

    {"box": [x0, y0, x1, y1], "points": [[x, y], ...], "labels": [1, 0, ...]}         # a 2D image
    {"slices": {"40": {"box": [...]}, "52": {"points": [[x, y]], "labels": [1]}}}       # a volume

The rules are `samed2_kit.prompts.check_prompt`'s, the same as the Python API's: an empty list is
a key left out, a box is its two corners in any order, points without "labels" are foreground,
coordinates are finite and inside the image. A 2D image is checked (`check_image`: at least 8 px
a side; RGBA loses its alpha channel when read) and its prompt checked against it before any
work. `--series-uid UID` picks one series of a DICOM folder holding several.

A volume is segmented from its prompted slices by propagation through SAM 2's memory path
(`samed2_kit.volume.propagate_volume`). A model with the hard_prototypes source may instead get
`--support IMAGE MASK` (2D, few-shot): then the prompts file is optional.

Outputs (atomic: a failed export leaves no file; in the current folder unless `--out` says
otherwise; an existing file is never replaced without `--overwrite`): a 2D image ->
`<stem>_mask.png` (0/255); a
volume -> `<stem>_mask.nii.gz` with the input's affine (`--format nifti`, default for NIfTI/NRRD)
or a DICOM Segmentation referencing the source series (`--format dicom-seg`, default for DICOM).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from samed2_kit.prompts import Prompt, check_prompt

FILE_FIELDS = ("box", "points", "labels")  # a prompts file's keys (a Prompt without mask)


def _prompt(entry, where: str) -> Prompt:
    """A prompts file's entry -> a Prompt (points without labels: all foreground, as everywhere);
    shapes and values checked, ranges later, against the image (`_check_2d`) or the slice
    (propagate_volume)."""
    return check_prompt(entry, where=where, fields=FILE_FIELDS)


def read_prompts(path: str | Path) -> dict:
    """{"image": Prompt} for a 2D prompts file, {"slices": {z: Prompt}} for a volume's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"prompts file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    if not isinstance(data, dict):
        raise ValueError(f"prompts file {path}: the top level must be an object")
    try:
        if "slices" not in data:
            return {"image": _prompt(data, "")}
        if not isinstance(data["slices"], dict) or not data["slices"]:
            raise ValueError('"slices" must map slice numbers to prompts')
        out = {}
        for key, entry in data["slices"].items():
            if not str(key).lstrip("-").isdigit():
                raise ValueError(f"slice key {key!r} is not a slice number")
            out[int(key)] = _prompt(entry, f'slices["{key}"]')
        return {"slices": out}
    except ValueError as e:
        raise ValueError(f"prompts file {path}: {e}") from e


def _output_format(fmt: str, volume, src: str | None) -> str:
    """The output format for `fmt` and an input read as `volume` from a `src` file format."""
    is_2d = volume.shape_zyx[0] == 1 and src == "image"
    if fmt == "auto":
        return "png" if is_2d else "dicom-seg" if src == "dicom" else "nifti"
    if fmt == "png" and not is_2d:
        raise ValueError("--format png is for 2D images: use nifti or dicom-seg for a volume")
    if fmt == "nifti" and not volume.meta.get("spacing_known", True):
        raise ValueError(
            f"{volume.meta.get('source')} has no geometry (a 2D image without pixel spacing): "
            "write --format png, or predict on a NIfTI/NRRD/DICOM volume"
        )
    if fmt == "dicom-seg" and src != "dicom":
        raise ValueError(
            f"--format dicom-seg references the source DICOM series, but the input is "
            f"{src or 'not DICOM'}: predict on the DICOM series folder, or use --format nifti"
        )
    return fmt


def predict_file(model, input_path, prompts_path=None, out=None, fmt="auto", modality="auto",
                 window=None, support=None, progress=True, trained_on=(),
                 overwrite=False, series_uid=None) -> Path:  # fmt: skip
    """Segment `input_path` with `model` (a SAMed2Model, or an OnnxModel of an export folder:
    onnxruntime); returns the mask file written (see the module doc).
    `series_uid`: the DICOM series to read from a folder holding several (`--series-uid`).
    `trained_on`: the modalities of the model's training data (its model.json); a volume whose
    file names none is read with that modality's intensity rules when `modality` is "auto" and
    it is a single "ct" or "mr". `out`: a file, or a folder for `<stem>_mask.<ext>` (default:
    the current folder); an existing file, the input above all, is replaced only with
    `overwrite`, and the check runs before any work."""
    from samed2_kit.medbank.io import _format_of, read_volume

    input_path = Path(input_path)
    if series_uid is not None and input_path.exists() and _format_of(input_path) != "dicom":
        raise ValueError(
            f"--series-uid picks a series of a DICOM folder, and {input_path} is not DICOM: "
            "leave --series-uid out"
        )
    volume = read_volume(input_path, series_uid=series_uid)
    modality = volume_modality(volume, modality, window, trained_on)
    fmt = _output_format(fmt, volume, _format_of(input_path))
    prompts = read_prompts(prompts_path) if prompts_path else None
    stem = input_path.name.split(".")[0] if input_path.is_file() else input_path.name
    suffix = {"png": ".png", "nifti": ".nii.gz", "dicom-seg": ".dcm"}[fmt]
    out = Path(out) if out else Path.cwd()
    target = out / f"{stem}_mask{suffix}" if out.suffix == "" else out
    _check_target(target, input_path, overwrite)
    if fmt == "png":
        image = _check_2d(volume.array[0], prompts, support, input_path, prompts_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        mask = _predict_2d(model, image, prompts, modality, window, support)
        return _write_png(mask, target)
    if prompts is None or "slices" not in prompts:
        raise ValueError(
            f"{input_path} is a volume ({volume.shape_zyx[0]} slices): the prompts file needs "
            '"slices": {"<slice number>": {"box": [...]}}'
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    from samed2_kit.volume import propagate_volume

    onnx = type(model).__name__ == "OnnxModel"  # an export folder (`samed2 export`)
    mask = propagate_volume(None if onnx else model, volume, prompts["slices"], modality=modality,
                            window=window, progress=progress, backend="onnx" if onnx else "torch",
                            export_dir=model.folder if onnx else None)  # fmt: skip
    from samed2_kit import export

    if fmt == "nifti":
        return export.write_nifti(mask, volume, target)
    # a named segment, so that an empty prediction is still a valid (empty) Segmentation
    return export.write_dicom_seg(mask, input_path, target, labels={1: "samed2 prediction"},
                                  series_uid=series_uid)  # fmt: skip


def volume_modality(volume, modality: str, window, trained_on) -> str:
    """The intensity handling for `volume`: `modality` unless it is "auto", the input is a
    volume (several slices) whose metadata names no modality, no window is given, and the
    model trained on exactly one of "ct"/"mr" (then that one)."""
    named = str(volume.meta.get("modality", "")).lower() in ("ct", "mr")
    known = sorted({str(m).lower() for m in trained_on})
    if modality != "auto" or window is not None or named or volume.shape_zyx[0] < 2:
        return modality
    if len(known) == 1 and known[0] in ("ct", "mr"):
        print(f"[samed2] intensity: {known[0]} (what the model trained on; --modality to change)")
        return known[0]
    return modality


def _check_2d(image, prompts, support, input_path: Path, prompts_path) -> np.ndarray:
    """`image` checked (`check_image`) and its prompt checked against its size, before any work
    (a clear error and no output folder)."""
    from samed2_kit.model.image_input import check_image

    if support is None and prompts is None:
        raise ValueError("a 2D prediction needs --prompts (or --support IMAGE MASK for few-shot)")
    if prompts is not None and "slices" in prompts:
        raise ValueError('a 2D image takes a prompts file without "slices": {"box": [...]}')
    image = check_image(image, str(input_path))
    if prompts is not None:
        try:
            check_prompt(prompts["image"], image.shape[:2], fields=FILE_FIELDS)
        except ValueError as e:
            raise ValueError(f"prompts file {prompts_path}: {e}") from e
    return image


def _predict_2d(model, image, prompts, modality, window, support) -> np.ndarray:
    from samed2_kit.model.predictor import Predictor

    pred = Predictor(model)
    if support is not None:
        from samed2_kit.medbank.io.image import read_image, read_mask

        images, masks = zip(*[(read_image(i), read_mask(m)) for i, m in support], strict=True)
        pred.set_support(list(images), list(masks), modality=modality, window=window)
    pred.set_image(image, modality=modality, window=window)
    p = prompts["image"] if prompts else Prompt()
    masks, _, _ = pred.predict(point_coords=p.points, point_labels=p.labels, box=p.box,
                               multimask_output=False)  # fmt: skip
    return masks[0]


def _check_target(target: Path, input_path: Path, overwrite: bool) -> None:
    """A clear error, before any work, when the output would replace a file (the input above
    all) without `overwrite`, or names a folder."""
    if target.is_dir():
        raise ValueError(f"--out {target} is a folder named like a file: give a file name, or "
                         "a folder without a suffix")  # fmt: skip
    if overwrite or not target.exists():
        return
    if input_path.exists() and target.resolve() == input_path.resolve():
        raise ValueError(f"--out {target} is the input itself: the mask would replace the image; "
                         "choose another --out (or pass --overwrite to replace it)")  # fmt: skip
    raise ValueError(f"{target} exists: choose another --out, or pass --overwrite to replace it")


def _write_png(mask: np.ndarray, path: Path) -> Path:
    from PIL import Image

    from samed2_kit.utils.atomic import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    return path
