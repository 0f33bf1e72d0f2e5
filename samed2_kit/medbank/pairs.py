"""A folder of image/mask pairs as a source of samples (no torch: the Dataset over the records is
``samed2_kit.medbank.pair_dataset.PairDataset``).

``PairSource`` describes a folder with two path patterns relative to its root, e.g. HC18:
``image="images/{id}HC.png", mask="masks/{id}HC_Annotation.png"``. ``{id}`` (required in both)
is the image id; ``{label}`` (optional, mask only) lets one image have several masks, one sample
per mask (SAM-Med2D: ``mask="masks/{id}_{label}.png"``; BUSI: ``mask="{id}_mask{label}.png"``,
label "" or "_1"). Patterns match whole ``/``-separated relative paths, case-sensitively.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samed2_kit.medbank.preprocess import canonical_modality


@dataclass
class PairSource:
    """A folder of pairs. ``modality`` is metadata; ``intensity`` picks :func:`normalize_intensity`'s
    rule (with ``window`` for CT). ``case``: regex searched in the id, group 1 = case id (default:
    case = id). ``spacing_csv``: CSV (relative to root) with a file-name and a pixel-size (mm) column."""

    root: str
    image: str
    mask: str
    modality: str = "2d"
    task: str = "default"
    case: str | None = None
    spacing_csv: str | None = None
    licence: str = "unknown"
    window: tuple[float, float] | None = None
    intensity: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("image", {"{id}"}), ("mask", {"{id}", "{label}"})):
            pattern = getattr(self, name)
            found = re.findall(r"\{[^{}]*\}", pattern)
            if found.count("{id}") != 1 or set(found) - allowed or found.count("{label}") > 1:
                raise ValueError(
                    f"PairSource.{name}={pattern!r}: needs exactly one {{id}}"
                    + (
                        " and at most one {label}"
                        if name == "mask"
                        else " and no other placeholder"
                    )
                )
        canonical_modality(self.intensity)


@dataclass
class PairRecord:
    """One (image, mask) sample. ``spacing`` in mm as (row, col); ``spacing_known`` False = (1, 1) guess."""

    image_path: str
    mask_path: str
    sample_id: str
    case_id: str
    label: str
    modality: str
    task: str
    spacing: tuple[float, float] = (1.0, 1.0)
    spacing_known: bool = False
    intensity: str = "auto"
    window: tuple[float, float] | None = None
    licence: str = "unknown"


@dataclass
class PairScan:
    """Result of :func:`find_pairs`: ``records`` sorted by sample id; ``skipped`` (path, reason)."""

    records: list[PairRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _regex(pattern: str, id_value: str | None = None) -> re.Pattern:
    idre = r"(?P<id>[^/]+)" if id_value is None else re.escape(id_value)
    parts = re.split(r"(\{id\}|\{label\})", pattern)
    subs = {"{id}": idre, "{label}": r"(?P<label>[^/]*)"}
    return re.compile("".join(subs.get(p, re.escape(p)) for p in parts))


def _walk(root: Path, pattern: str) -> list[str]:
    """Relative posix paths of the files under the literal folder part of ``pattern``."""
    literal = pattern.split("{", 1)[0]
    start = root / literal.rsplit("/", 1)[0] if "/" in literal else root
    out = []
    for folder, _, files in os.walk(start):
        rel = Path(folder).relative_to(root).as_posix()
        out += [f if rel == "." else f"{rel}/{f}" for f in files]
    return sorted(out)


def _read_spacing(path: Path) -> dict[str, float]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r]
    header = [h.strip().lower() for h in rows[0]] if rows else []
    name_col = next((i for i, h in enumerate(header) if "file" in h or "name" in h), None)
    size_col = next((i for i, h in enumerate(header) if "pixel" in h or "spacing" in h), None)
    if name_col is None or size_col is None:
        raise ValueError(
            f"spacing CSV {path} has header {header}: needs a file-name column (header with "
            "'file' or 'name') and a pixel-size column in mm (header with 'pixel' or 'spacing')"
        )
    return {Path(r[name_col].strip()).name: float(r[size_col]) for r in rows[1:]}


def find_pairs(src: PairSource) -> PairScan:
    """Match every image of ``src`` with its mask(s); unmatched files go to ``skipped``.

    A mask belongs to the *longest* image id it fits (``amos_0004_75_liver_000`` goes to
    ``amos_0004_75``, not to an image ``amos_0004``). A file that fits the image pattern but also
    fits as a mask of another image (``X_mask.png`` next to ``X.png``) is a mask, not an image,
    unless masks of its own exist (flat ``{id}_{label}.png``: ``a_1_2.png`` with ``a_1_2_x.png``).
    """
    root = Path(src.root)
    if not root.is_dir():
        raise FileNotFoundError(f"PairSource.root {root} does not exist or is not a folder")
    img_re, mask_re = _regex(src.image), _regex(src.mask)
    images = {m["id"]: rel for rel in _walk(root, src.image) if (m := img_re.fullmatch(rel))}
    masks = [rel for rel in _walk(root, src.mask) if mask_re.fullmatch(rel)]
    head, tail = src.mask.split("{id}")
    cache: dict[str, re.Pattern] = {}

    def assign(ids: dict[str, str], skip: set[str]) -> dict[str, tuple[str, str]]:
        owner = {}
        for rel in (
            r for r in masks if r not in skip
        ):  # candidate ids: prefixes after a literal head, or suffixes before a tail
            if "{label}" not in head:
                rest = rel[len(head) :]
                cands = [rest[:k] for k in range(len(rest), 0, -1)] if rel.startswith(head) else []
            else:
                rest = rel[: len(rel) - len(tail)]
                cands = [rest[-k:] for k in range(len(rest), 0, -1)] if rel.endswith(tail) else []
            for cand in cands:
                if cand in ids and ids[cand] != rel:
                    m = cache.setdefault(cand, _regex(src.mask, cand)).fullmatch(rel)
                    if m:
                        owner[rel] = (cand, m.groupdict().get("label") or "")
                        break
        return owner

    owner = assign(images, set())
    id_of_rel, owning = {rel: i for i, rel in images.items()}, {i for i, _ in owner.values()}
    for rel, (i, _) in owner.items():
        if id_of_rel.get(rel, i) != i and id_of_rel[rel] not in owning:
            images.pop(id_of_rel[rel])
    owner = assign(images, set(images.values()))
    spacing = _read_spacing(root / src.spacing_csv) if src.spacing_csv else {}
    scan, by_id = PairScan(), {}
    for rel, (i, label) in owner.items():
        by_id.setdefault(i, []).append((label, rel))
    for i, rel in images.items():
        if i not in by_id:
            hint = " (fits the mask pattern: its image missing?)" if mask_re.fullmatch(rel) else ""
            scan.skipped.append((str(root / rel), f"no mask {src.mask.replace('{id}', i)}{hint}"))
            continue
        case = i
        if src.case:
            m = re.search(src.case, i)
            if not m or not m.groups() or m.group(1) is None:
                raise ValueError(
                    f"PairSource.case {src.case!r} finds no group 1 in id {i!r}; fix the regex"
                )
            case = m.group(1)
        mm = spacing.get(Path(rel).name)
        for label, mrel in sorted(by_id[i]):
            scan.records.append(
                PairRecord(
                    image_path=str(root / rel), mask_path=str(root / mrel),
                    sample_id=f"{i}#{label}" if label else i, case_id=case, label=label,
                    modality=src.modality, task=src.task,
                    spacing=(mm, mm) if mm else (1.0, 1.0), spacing_known=bool(mm),
                    intensity=src.intensity, window=src.window, licence=src.licence,
                )
            )  # fmt: skip
    taken = set(owner) | set(images.values())
    scan.skipped += [(str(root / r), "no image for this mask") for r in masks if r not in taken]
    scan.records.sort(key=lambda r: r.sample_id)
    scan.skipped.sort()
    return scan


def split_by_case(
    records: Sequence[PairRecord], fractions: Mapping[str, float] | None = None, seed: int = 0
) -> dict[str, list[PairRecord]]:
    """Split records by case id (default fractions train 0.8 / test 0.2; they must sum to 1).

    Case ids are sorted, shuffled with ``seed`` and cut by largest remainder; every split with a
    fraction > 0 gets at least one case when there are enough cases. Deterministic.
    """
    fractions = dict(fractions or {"train": 0.8, "test": 0.2})
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} must be >= 0 and sum to 1")
    cases = sorted({r.case_id for r in records})
    cases = [cases[k] for k in np.random.default_rng(seed).permutation(len(cases))]
    n, names = len(cases), list(fractions)
    counts = {k: math.floor(fractions[k] * n) for k in names}
    by_rest = sorted(names, key=lambda k: -(fractions[k] * n - counts[k]))
    for k in by_rest[: n - sum(counts.values())]:
        counts[k] += 1
    wanted = [k for k in names if fractions[k] > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(names, key=lambda d: counts[d])
                counts[donor], counts[k] = counts[donor] - 1, 1
    split_of, start = {}, 0
    for k in names:
        split_of.update({c: k for c in cases[start : start + counts[k]]})
        start += counts[k]
    out: dict[str, list[PairRecord]] = {k: [] for k in names}
    for r in records:
        out[split_of[r.case_id]].append(r)
    return out


def sample_sources() -> dict[str, PairSource]:
    """The two sample sets bundled with the package (HC18 ultrasound, SAM-Med2D CT demo slices).

    The CT demo PNGs are already windowed to RGB 0-255, so their ``intensity`` is "2d" (as is)
    while ``modality`` stays "ct" as metadata.
    """
    import samed2_kit

    base = Path(samed2_kit.__file__).parent / "sample_data"
    return {
        "hc18": PairSource(
            root=str(base / "hc18"), image="images/{id}HC.png", mask="masks/{id}HC_Annotation.png",
            modality="us", task="fetal_head", case=r"^(\d+)", spacing_csv="pixel_size.csv",
            licence="CC-BY-4.0", intensity="2d",
        ),
        "sam_med2d_demo": PairSource(
            root=str(base / "sam_med2d_demo"), image="images/{id}.png", mask="masks/{id}_{label}.png",
            modality="ct", task="abdomen_ct_organs", case=r"^(.*)_\d+$", intensity="2d",
            licence="CC-BY-4.0 (AMOS, TotalSegmentator via SAM-Med2D, Apache-2.0)",
        ),
    }  # fmt: skip
