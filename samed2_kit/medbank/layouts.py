"""Enumerate the cases of a source by its layout, without reading pixel data.

Layouts: `pairs` (2D image/mask files by name patterns), `volumes` (3D image/label-map files by
patterns or explicit items), `nnunet` (raw dataset: dataset.json, imagesTr/<case>_0000<ending>,
labelsTr/<case><ending>), `msd` (Medical Segmentation Decathlon: dataset.json "training" list) and
`dicom` (explicit items: a series folder with a label map, DICOM-SEG or RTSTRUCT).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from samed2_kit.medbank.spec import ItemSpec, SourceSpec


@dataclass
class CaseRef:
    """One image of a source and where its labels are.

    kind: "masks" (2D binary mask files, `masks` = [(label name, path)]), "labelmap" (integer label
    volume at `labels`), "seg" (DICOM-SEG) or "rtstruct".
    case_id: the split unit, group 1 of the source's `case` regex on `key` (`key` itself without a
    regex); several images (keys) may share one case id.
    fov: pairs with a `fov` pattern: the image's field-of-view mask file (non-zero = inside).
    series_uid: the DICOM series to read when `image` is a folder holding several.
    """

    key: str  # unique within the source (duplicates are skipped)
    case_id: str  # split unit: never in two splits
    image: str
    kind: str
    labels: str | None = None
    masks: list[tuple[str, str]] = field(default_factory=list)
    spacing_yx: tuple[float, float] | None = None  # 2D pixel size (mm) when known
    fov: str | None = None
    series_uid: str | None = None


def _case_of(key: str, regex: str | None, source: str = "") -> str:
    """Group 1 of `regex` searched in `key` (the key itself without a regex).

    Raises:
        ValueError: the regex does not match `key` or its group 1 is empty there (naming the
            source, the spec key `case` and the id): a case regex must fit every id, else images
            of one subject could land in two splits.
    """
    if not regex:
        return key
    m = re.search(regex, key)
    if not m or not m.groups() or not m.group(1):
        raise ValueError(
            f"{source and f'source {source!r}: '}case regex {regex!r} finds no group 1 in id "
            f"{key!r}; fix the spec key case so that group 1 captures the case id of every id"
        )
    return m.group(1)


def _pairs(src: SourceSpec) -> tuple[list[CaseRef], list[tuple[str, str]]]:
    from samed2_kit.medbank.pairs import PairSource, find_pairs

    try:
        scan = find_pairs(
            PairSource(root=src.root, image=src.image, mask=src.mask, modality=src.modality,
                       task=src.task, case=src.case, spacing_csv=src.spacing_csv,
                       licence=src.licence, spacing=src.spacing, fov=src.fov)
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"source {src.name!r}: {e}") from e
    by_image: dict[str, CaseRef] = {}
    for r in scan.records:
        ref = by_image.get(r.image_path)
        if ref is None:
            spacing = tuple(r.spacing) if r.spacing_known else None
            key = r.sample_id.split("#")[0]
            ref = by_image[r.image_path] = CaseRef(
                key, r.case_id, r.image_path, "masks", spacing_yx=spacing, fov=r.fov_path
            )
        ref.masks.append((r.label or src.task, r.mask_path))
    return list(by_image.values()), list(scan.skipped)


def _items(src: SourceSpec) -> list[CaseRef]:
    root = Path(src.root)
    out = []
    for i, it in enumerate(src.items):
        it: ItemSpec
        given = [k for k in ("mask", "seg", "rtstruct") if getattr(it, k)]
        if len(given) != 1:
            raise ValueError(
                f"source {src.name!r} item {i} ({it.image}): give exactly one of mask, seg, rtstruct"
            )
        kind = {"mask": "labelmap", "seg": "seg", "rtstruct": "rtstruct"}[given[0]]
        key = it.id or Path(it.image).name
        out.append(
            CaseRef(key, _case_of(key, src.case, src.name), str(root / it.image), kind,
                    labels=str(root / getattr(it, given[0])), series_uid=it.series_uid)
        )  # fmt: skip
    return out


def _volume_patterns(src: SourceSpec) -> tuple[list[CaseRef], list[tuple[str, str]]]:
    from samed2_kit.medbank.pairs import PairSource, find_pairs

    try:
        scan = find_pairs(PairSource(root=src.root, image=src.image, mask=src.mask))
    except ValueError as e:
        raise ValueError(f"source {src.name!r}: {e}") from e
    refs = [
        CaseRef(
            r.sample_id,
            _case_of(r.sample_id, src.case, src.name),
            r.image_path,
            "labelmap",
            labels=r.mask_path,
        )
        for r in scan.records
    ]
    return refs, list(scan.skipped)


def _dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an nnU-Net/MSD dataset folder has a dataset.json"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def _nnunet(src: SourceSpec) -> tuple[list[CaseRef], list[tuple[str, str]]]:
    root = Path(src.root)
    meta = _dataset_json(root)
    ending = meta.get("file_ending", ".nii.gz")
    refs, skipped = [], []
    for label in sorted((root / "labelsTr").glob(f"*{ending}")):
        key = label.name[: -len(ending)]
        image = root / "imagesTr" / f"{key}_0000{ending}"
        if not image.is_file():
            skipped.append((str(label), f"no image {image.name} (channel 0000) in imagesTr"))
            continue
        refs.append(
            CaseRef(
                key, _case_of(key, src.case, src.name), str(image), "labelmap", labels=str(label)
            )
        )
    return refs, skipped


def _msd(src: SourceSpec) -> tuple[list[CaseRef], list[tuple[str, str]]]:
    root = Path(src.root)
    meta = _dataset_json(root)
    if "training" not in meta:
        raise ValueError(f"{root / 'dataset.json'} has no 'training' list (MSD format)")
    refs, skipped = [], []
    for entry in meta["training"]:
        image, label = root / entry["image"], root / entry["label"]
        key = Path(entry["image"]).name.split(".")[0]
        missing = [str(p) for p in (image, label) if not p.is_file()]
        if missing:
            skipped.append((missing[0], "listed in dataset.json but missing"))
            continue
        refs.append(
            CaseRef(
                key, _case_of(key, src.case, src.name), str(image), "labelmap", labels=str(label)
            )
        )
    return refs, skipped


def label_names(src: SourceSpec) -> dict[int, str]:
    """Label id -> name: from the spec, a labels JSON file, or the nnU-Net/MSD dataset.json."""
    names = {int(k): v for k, v in src.labels.items()}
    root = Path(src.root)
    if src.labels_json:
        data = json.loads((root / src.labels_json).read_text())
        if src.labels_key:
            data = data[src.labels_key]
        names.update({int(k): str(v) for k, v in data.items()})
    if src.layout in ("nnunet", "msd"):
        labels = _dataset_json(root).get("labels", {})
        for k, v in labels.items():
            if src.layout == "nnunet" and isinstance(v, int):
                names.setdefault(v, k)
            elif src.layout == "msd":
                names.setdefault(int(k), str(v))
    names.pop(0, None)
    return names


def enumerate_cases(src: SourceSpec) -> tuple[list[CaseRef], list[tuple[str, str]]]:
    """(cases, skipped (path, reason)) of a source; duplicate keys are skipped with a reason."""
    if not Path(src.root).exists():
        raise FileNotFoundError(f"source {src.name!r}: root {src.root} does not exist")
    if src.layout == "pairs":
        refs, skipped = _pairs(src)
    elif src.layout == "volumes":
        refs, skipped = _volume_patterns(src) if src.image else ([], [])
        refs += _items(src)
    elif src.layout == "dicom":
        refs, skipped = _items(src), []
    elif src.layout == "nnunet":
        refs, skipped = _nnunet(src)
    else:
        refs, skipped = _msd(src)
    seen, unique = set(), []
    for r in refs:
        if r.key in seen:
            skipped.append((r.image, f"duplicate case id {r.key!r} in source {src.name!r}"))
            continue
        seen.add(r.key)
        unique.append(r)
    return unique, skipped
