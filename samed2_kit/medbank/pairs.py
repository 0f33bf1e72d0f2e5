"""A folder of image/mask pairs as a source of samples (no torch: the Dataset over the records is
``samed2_kit.medbank.pair_dataset.PairDataset``).

``PairSource`` describes a folder with two path patterns relative to its root, e.g. HC18:
``image="images/{id}HC.png", mask="masks/{id}HC_Annotation.png"``. ``{id}`` (required in both)
is the image id; ``{label}`` (optional, mask only) lets one image have several masks, one sample
per mask (SAM-Med2D: ``mask="masks/{id}_{label}.png"``; BUSI: ``mask="{id}_mask{label}.png"``,
label "" or "_1"). Patterns match whole ``/``-separated relative paths, case-sensitively except
the file-name extension: ``{id}.jpg`` also matches ``a.JPG`` (HRF), never ``A.jpg`` for id ``a``.
The extension is the text from the first dot after the pattern's last placeholder
(``{id}_mask.tif`` -> ``.tif``, ``{id}.nii.gz`` -> ``.nii.gz``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samed2_kit.medbank.preprocess import canonical_modality
from samed2_kit.medbank.spacing import read_spacing_csv, spacing_lookup, spacing_pair

_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_SEPARATORS = "_-. "  # what joins an image id to the rest of another label's mask name


@dataclass
class PairSource:
    """A folder of pairs. ``modality`` is metadata; ``intensity`` picks :func:`normalize_intensity`'s
    rule (with ``window`` for CT). ``case``: regex searched in the id, group 1 = case id (default:
    case = id). Pixel size in mm (row, col): ``spacing`` (one value, or (row, col)) for every
    image, or ``spacing_csv``, a CSV (relative to root) with one row per image (see
    :func:`read_spacing_csv`); neither: unknown (1 per pixel). ``fov``: pattern with ``{id}`` of a
    field-of-view mask per image (non-zero = inside), e.g. HRF's ``mask/{id}_mask.tif``."""

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
    spacing: float | tuple[float, float] | None = None
    fov: str | None = None

    def __post_init__(self) -> None:
        checks = [("image", {"{id}"}), ("mask", {"{id}", "{label}"})]
        checks += [("fov", {"{id}"})] if self.fov else []
        for name, allowed in checks:
            pattern = getattr(self, name)
            found = _PLACEHOLDER.findall(pattern)
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
        if self.spacing is not None:
            self.spacing = spacing_pair(self.spacing, "PairSource.spacing")
        if self.spacing is not None and self.spacing_csv:
            raise ValueError("PairSource: give spacing or spacing_csv, not both")


@dataclass
class PairRecord:
    """One (image, mask) sample. ``spacing`` in mm as (row, col); ``spacing_known`` False = (1, 1)
    guess. ``fov_path``: the image's field-of-view mask file, when the source has one."""

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
    fov_path: str | None = None


@dataclass
class PairScan:
    """Result of :func:`find_pairs`: ``records`` sorted by sample id; ``skipped`` (path, reason)."""

    records: list[PairRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def pattern_extension(pattern: str) -> str:
    """The file-name extension of a pattern, lower case: the last path segment's text from the
    first dot after its last placeholder ('' when there is none).

    ``"masks/{id}_mask.png"`` -> ``".png"``; ``"{id}_img.nii.gz"`` -> ``".nii.gz"``."""
    last = pattern.rsplit("/", 1)[-1]
    tail = re.split(r"\{id\}|\{label\}", last)[-1]
    return tail[tail.index(".") :].lower() if "." in tail else ""


def _with_ext(rel: str, exts: Sequence[str]) -> str:
    """`rel` with a trailing extension from `exts` (lower case) spelt in lower case."""
    low = rel.lower()
    for ext in exts:
        if ext and low.endswith(ext):
            return rel[: len(rel) - len(ext)] + ext
    return rel


def _regex(pattern: str, id_value: str | None = None) -> re.Pattern:
    idre = r"(?P<id>[^/]+)" if id_value is None else re.escape(id_value)
    parts = re.split(r"(\{id\}|\{label\})", pattern)
    subs = {"{id}": idre, "{label}": r"(?P<label>[^/]*)"}
    return re.compile("".join(subs.get(p, re.escape(p)) for p in parts))


def _start(root: Path, pattern: str) -> Path:
    """The folder under `root` holding every file `pattern` can match (its literal folder part)."""
    literal = pattern.split("{", 1)[0]
    return root / literal.rsplit("/", 1)[0] if "/" in literal else root


def _walk(root: Path, pattern: str) -> list[str]:
    """Relative posix paths of the files under the literal folder part of ``pattern``."""
    out = []
    for folder, _, files in os.walk(_start(root, pattern)):
        rel = Path(folder).relative_to(root).as_posix()
        out += [f if rel == "." else f"{rel}/{f}" for f in files]
    return sorted(out)


def _matched_nothing(what: str, pattern: str, root: Path, files: list[str]) -> ValueError:
    """The error for a pattern that fits no file: where it looked and what lies there."""
    start = _start(root, pattern)
    if not start.is_dir():
        there = f"{start} does not exist"
    elif not files:
        there = f"{start} holds no file"
    else:
        names = [Path(f).name for f in files]
        more = f", ... ({len(names)} files)" if len(names) > 5 else ""
        there = f"files there look like: {', '.join(names[:5])}{more}"
    return ValueError(
        f"{what} pattern {pattern!r} matched no file under {start}; {there}. Fix the pattern "
        "({id} stands for the image id; names match case-sensitively except the extension)"
    )


def _extends_paired_id(mask_id: str, paired: set[str]) -> bool:
    """True when `mask_id` is a paired image id plus a separator and more (``01_od`` for image
    ``01``): a file of another label or source in the same folder, not an orphan mask."""
    return any(mask_id[k] in _SEPARATORS and mask_id[:k] in paired for k in range(1, len(mask_id)))


def find_pairs(src: PairSource) -> PairScan:
    """Match every image of ``src`` with its mask(s); unmatched files go to ``skipped``.

    A mask belongs to the *longest* image id it fits (``amos_0004_75_liver_000`` goes to
    ``amos_0004_75``, not to an image ``amos_0004``). A file that fits the image pattern but also
    fits as a mask of another image (``X_mask.png`` next to ``X.png``) is a mask, not an image,
    unless masks of its own exist (flat ``{id}_{label}.png``: ``a_1_2.png`` with ``a_1_2_x.png``).
    A file that fits the mask pattern only with an id that is a paired image's id plus a separator
    and more (``masks/01_od.png`` under ``masks/{id}.png`` with image ``01`` paired) belongs to
    another label or source sharing the folder: it is neither used nor reported. Field-of-view
    files (``fov``) are never images or masks.

    Skipped (path, reason): an image without mask, without field-of-view file, or without a row
    in the spacing CSV; a mask without image; two files whose names differ only in the case of
    the extension.

    Raises:
        FileNotFoundError: ``root`` (or the spacing CSV) does not exist.
        ValueError: a pattern matches no file at all (once per source, listing what lies where it
            looked), images and masks exist but no id pairs, a ``case`` regex without group 1
            for an id, no image has a spacing CSV row, or a malformed spacing CSV.
    """
    root = Path(src.root)
    if not root.is_dir():
        raise FileNotFoundError(f"PairSource.root {root} does not exist or is not a folder")
    patterns = {"image": src.image, "mask": src.mask} | ({"fov": src.fov} if src.fov else {})
    exts = sorted({pattern_extension(p) for p in patterns.values()} - {""}, key=len, reverse=True)
    norm_pat = {k: _with_ext(p, exts) for k, p in patterns.items()}
    actual: dict[str, str] = {}  # name with lower-case extension -> name on disk
    scan, clashes = PairScan(), set()

    def listing(kind: str) -> list[str]:
        out = []
        for rel in _walk(root, patterns[kind]):
            key = _with_ext(rel, exts)
            if actual.setdefault(key, rel) != rel:
                if rel not in clashes:
                    clashes.add(rel)
                    scan.skipped.append(
                        (str(root / rel), f"same name as {actual[key]} but for the extension's "
                         "case: ambiguous; rename or remove one")
                    )  # fmt: skip
                continue
            out.append(key)
        return out

    files = {kind: listing(kind) for kind in patterns}
    img_re, mask_re = _regex(norm_pat["image"]), _regex(norm_pat["mask"])
    images = {m["id"]: rel for rel in files["image"] if (m := img_re.fullmatch(rel))}
    masks = [rel for rel in files["mask"] if mask_re.fullmatch(rel)]
    if not images:
        raise _matched_nothing("image", src.image, root, [actual[r] for r in files["image"]])
    if not masks:
        raise _matched_nothing("mask", src.mask, root, [actual[r] for r in files["mask"]])
    fovs: set[str] = set()
    if src.fov:
        fov_re = _regex(norm_pat["fov"])
        fovs = {rel for rel in files["fov"] if fov_re.fullmatch(rel)}
        if not fovs:
            raise _matched_nothing("fov", src.fov, root, [actual[r] for r in files["fov"]])
        fov_of = {i: norm_pat["fov"].replace("{id}", i) for i in images}
        taken_fov = set(fov_of.values()) & fovs
        images = {i: rel for i, rel in images.items() if rel not in taken_fov}
        masks = [rel for rel in masks if rel not in taken_fov]
    head, tail = norm_pat["mask"].split("{id}")
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
                    m = cache.setdefault(cand, _regex(norm_pat["mask"], cand)).fullmatch(rel)
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
    by_id: dict[str, list[tuple[str, str]]] = {}
    for rel, (i, label) in owner.items():
        by_id.setdefault(i, []).append((label, rel))
    if not by_id:
        some_masks = ", ".join(actual[r] for r in masks[:3])
        raise ValueError(
            f"no image under {root} pairs with a mask: image ids look like "
            f"{sorted(images)[:3]} (from image pattern {src.image!r}); masks such as "
            f"{some_masks} fit mask pattern {src.mask!r} with no such id. Fix the patterns so "
            "{id} is the same text in both (ids match case-sensitively)"
        )
    spacing_of = None
    if src.spacing_csv:
        csv_path = root / src.spacing_csv
        spacing_of = spacing_lookup(read_spacing_csv(csv_path))
        if not any(spacing_of(Path(actual[images[i]]).name) for i in by_id):
            raise ValueError(
                f"spacing CSV {csv_path}: no row names any of the {len(by_id)} paired images "
                f"(e.g. {Path(actual[images[next(iter(by_id))]]).name!r}); rows are matched by "
                "the image's file name: fix the CSV's names or the spacing_csv key"
            )
    for i, rel in images.items():
        path = str(root / actual[rel])
        if i not in by_id:
            hint = " (fits the mask pattern: its image missing?)" if mask_re.fullmatch(rel) else ""
            scan.skipped.append((path, f"no mask {src.mask.replace('{id}', i)}{hint}"))
            continue
        fov_path = None
        if src.fov:
            fov_rel = norm_pat["fov"].replace("{id}", i)
            if fov_rel not in fovs:
                scan.skipped.append(
                    (path, f"no field-of-view mask {root / src.fov.replace('{id}', i)} "
                     f"(spec key fov={src.fov!r}): add the file or remove fov")
                )  # fmt: skip
                continue
            fov_path = str(root / actual[fov_rel])
        case = i
        if src.case:
            m = re.search(src.case, i)
            if not m or not m.groups() or not m.group(1):
                raise ValueError(
                    f"case regex {src.case!r} finds no group 1 in id {i!r} (image {path}); "
                    "fix the regex so that group 1 captures the case id of every image"
                )
            case = m.group(1)
        spacing, known = src.spacing or (1.0, 1.0), src.spacing is not None
        if spacing_of is not None:
            mm = spacing_of(Path(path).name)
            if mm is None:
                scan.skipped.append(
                    (path, f"no row for {Path(path).name!r} in spacing CSV "
                     f"{root / src.spacing_csv}: add its pixel size (mm), or remove spacing_csv "
                     "to read every image with unknown spacing (metrics in pixels)")
                )  # fmt: skip
                continue
            spacing, known = (mm, mm), True
        for label, mrel in sorted(by_id[i]):
            scan.records.append(
                PairRecord(
                    image_path=path, mask_path=str(root / actual[mrel]),
                    sample_id=f"{i}#{label}" if label else i, case_id=case, label=label,
                    modality=src.modality, task=src.task, spacing=tuple(spacing),
                    spacing_known=known, intensity=src.intensity, window=src.window,
                    licence=src.licence, fov_path=fov_path,
                )
            )  # fmt: skip
    taken = set(owner) | set(images.values())
    paired = set(by_id)
    for rel in masks:
        if rel in taken:
            continue
        if _extends_paired_id(mask_re.fullmatch(rel)["id"], paired):
            continue  # another label's or source's mask in a shared folder
        scan.skipped.append((str(root / actual[rel]), "no image for this mask"))
    scan.records.sort(key=lambda r: r.sample_id)
    scan.skipped.sort()
    return scan


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of `n` units each split gets: floor of fraction * n, the rest by largest remainder,
    and at least one for every split with a fraction > 0 when `n` allows (the rule of
    `split_by_case`, and of `plan.slab_ranges` over the slices of a volume)."""
    names = list(fractions)
    counts = {k: int(np.floor(fractions[k] * n)) for k in names}
    for k in sorted(names, key=lambda k: -(fractions[k] * n - counts[k]))[
        : n - sum(counts.values())
    ]:
        counts[k] += 1
    wanted = [k for k in names if fractions[k] > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(names, key=lambda d: counts[d])
                counts[donor], counts[k] = counts[donor] - 1, 1
    return counts


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
    names = list(fractions)
    counts = split_counts(len(cases), fractions)
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
