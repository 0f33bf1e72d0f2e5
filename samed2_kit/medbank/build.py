"""`medbank build`: curate sources into one store (see `schema.py` for its layout).

Cases are split by case id per source (seeded) before any pixel is read; each case is read,
preprocessed, sliced and written; a case that fails is skipped with its reason in the report and
the manifest. The store is built in a temporary folder and renamed into place at the end, so a
failed or interrupted build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samed2_kit.medbank.schema import IMAGES_DIR, MANIFEST, SAMPLES_DIR, SCHEMA_VERSION
from samed2_kit.medbank.spec import BuildSpec


@dataclass
class BuildReport:
    out: str
    images: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    slices_per_s: float = 0.0


def encode_png(arr: np.ndarray) -> bytes:
    """8-bit (H, W) or RGB (H, W, 3) array -> PNG bytes."""
    import cv2

    if arr.ndim == 3:
        arr = cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr))
    if not ok:
        raise ValueError(f"could not encode a {arr.shape} {arr.dtype} array as PNG")
    return buf.tobytes()


def _resize(img: np.ndarray, mask: bool, max_size: int | None) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return img
    s = max_size / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if mask:
        return cv2.resize(img.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


class _Table:
    """Rows of one table, flushed to Arrow shards every `chunk` rows; hashed as they come."""

    def __init__(self, folder: Path, features, image_key: str, chunk: int = 2000):
        self.folder, self.features, self.key, self.chunk = folder, features, image_key, chunk
        self.rows: list[dict] = []
        self.shards: list[Path] = []
        self.n = 0
        self.sha = hashlib.sha256()

    def add(self, row: dict) -> int:
        self.sha.update(row_digest(row, self.key))
        row[self.key] = {"bytes": row[self.key], "path": None}
        self.rows.append(row)
        self.n += 1
        if len(self.rows) >= self.chunk:
            self.flush()
        return self.n - 1

    def flush(self) -> None:
        from datasets import Dataset

        if self.rows:
            path = self.folder / f"shard-{len(self.shards):05d}"
            Dataset.from_list(self.rows, features=self.features).save_to_disk(str(path))
            self.shards.append(path)
            self.rows = []

    def finish(self, dest: Path) -> None:
        from datasets import concatenate_datasets, load_from_disk

        self.flush()
        if not self.shards:
            return
        parts = [load_from_disk(str(p)) for p in self.shards]
        concatenate_datasets(parts).save_to_disk(str(dest))


def row_digest(row: dict, image_key: str) -> bytes:
    """What a row contributes to its table's content hash: its PNG bytes and its other fields."""
    data = row[image_key]
    data = data["bytes"] if isinstance(data, dict) else data
    rest = json.dumps({k: v for k, v in row.items() if k != image_key}, sort_keys=True, default=str)
    return hashlib.sha256(data).digest() + hashlib.sha256(rest.encode()).digest()


def _write_case(sliced, ref, src, case_id, split, spec: BuildSpec, images, samples) -> int:
    """Append a sliced case to the tables; returns the number of sample rows written."""
    n, r = len(sliced.images), spec.clip_radius
    zs = sorted({z for _, _, z, _ in sliced.samples})
    needed = sorted({min(max(z + d, 0), n - 1) for z in zs for d in range(-r, r + 1)})
    h, w = sliced.images.shape[1:3]
    sh, sw = _resize(np.zeros((h, w), np.uint8), True, spec.max_size).shape
    # in-plane spacing of the stored (possibly downscaled) pixels; float32 as stored, for hashing
    spacing = [
        float(np.float32(v))
        for v in (sliced.spacing[0], sliced.spacing[1] * h / sh, sliced.spacing[2] * w / sw)
    ]
    image_row = {}
    for z in needed:
        img = sliced.images[z]
        image_row[z] = images.add({
            "image": encode_png(_resize(img, False, spec.max_size)), "dataset": src.name,
            "case_id": case_id, "slice_index": z, "num_slices": n, "spacing": spacing,
            "original_size": list(img.shape[:2]), "split": split,
        })  # fmt: skip
    # sample rows are numbered before they are written, so neighbours can point at each other
    first = samples.n
    row_of = {(lab, z): first + i for i, (lab, _, z, _) in enumerate(sliced.samples)}
    for lab, name, z, mask in sliced.samples:
        near = [min(max(z + d, 0), n - 1) for d in range(-r, r + 1)]
        stored = _resize(mask.astype(np.uint8) * 255, True, spec.max_size)
        samples.add({
            "mask": encode_png(stored),
            "image_row": image_row[z], "neighbors": [image_row[k] for k in near],
            "neighbor_samples": [row_of.get((lab, k), -1) for k in near],
            "label": name, "label_id": lab, "modality": src.modality, "task": src.task,
            "dataset": src.name, "case_id": case_id, "slice_index": z,
            "mask_area": int((stored > 0).sum()), "spacing": spacing,
            "original_size": list(mask.shape[:2]), "licence": src.licence, "split": split,
        })  # fmt: skip
    return len(sliced.samples)


def _add_source(
    src,
    si: int,
    spec: BuildSpec,
    images: _Table,
    samples: _Table,
    report: BuildReport,
    progress: bool,
) -> tuple[dict, Counter, int]:
    """Read, slice and write one source's cases (failures go to ``report.skipped``); returns its
    manifest entry, its sample counts per (modality, task, split) and the number of slices read."""
    from tqdm.auto import tqdm

    from samed2_kit.medbank.cases import load_case, slice_case
    from samed2_kit.medbank.layouts import enumerate_cases, label_names
    from samed2_kit.medbank.pairs import split_by_case

    info = {"name": src.name, "layout": src.layout, "root": src.root, "modality": src.modality,
            "task": src.task, "licence": src.licence, "cases": 0, "samples": 0, "skipped": 0,
            "spacing_unknown": []}  # fmt: skip
    counts: Counter = Counter()
    try:
        refs, skipped = enumerate_cases(src)
        names = label_names(src)
    except (ValueError, FileNotFoundError, KeyError) as e:
        report.skipped.append((src.root, str(e)))
        info["skipped"] += 1
        return info, counts, 0
    report.skipped += skipped
    info["skipped"] += len(skipped)
    split_of = {
        r.key: k
        for k, rs in split_by_case(refs, src.split or spec.split, spec.seed).items()
        for r in rs
    }
    n_slices = 0
    for ci, ref in enumerate(tqdm(refs, desc=f"build {src.name}", disable=not progress)):
        try:
            vol, segs = load_case(ref, src, names)
            sliced = slice_case(vol, segs, src, seed=spec.seed * 1_000_003 + si * 10_007 + ci)
        except (ValueError, FileNotFoundError, OSError, KeyError) as e:
            report.skipped.append((ref.image, str(e)))
            info["skipped"] += 1
            continue
        if not sliced.samples:
            report.skipped.append((ref.image, "no non-empty mask in this case"))
            info["skipped"] += 1
            continue
        split = split_of[ref.key]
        case_id = f"{src.name}/{ref.case_id}"
        n = _write_case(sliced, ref, src, case_id, split, spec, images, samples)
        if not sliced.spacing_known and case_id not in info["spacing_unknown"]:
            info["spacing_unknown"].append(case_id)  # its metrics are in pixels
        n_slices += len(sliced.images)
        info["cases"] += 1
        info["samples"] += n
        counts[(src.modality, src.task, split)] += n
    return info, counts, n_slices


def _manifest(
    spec: BuildSpec, spec_sha256: str, sources_info: list[dict], counts: Counter,
    images: _Table, samples: _Table, report: BuildReport,
) -> dict:  # fmt: skip
    """The store's manifest: schema, tool, spec, sources, sample counts, totals, hashes, skips."""
    from samed2_kit import __version__

    return {
        "schema_version": SCHEMA_VERSION, "tool": f"samed2-kit {__version__}",
        "name": spec.name, "spec_sha256": spec_sha256, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": spec.split, "seed": spec.seed, "clip_radius": spec.clip_radius,
        "max_size": spec.max_size, "sources": sources_info,
        "counts": [{"modality": m, "task": t, "split": s, "samples": n} for (m, t, s), n in sorted(counts.items())],
        "totals": {"images": images.n, "samples": samples.n},
        "licences": sorted({s.licence for s in spec.sources}),
        "content_sha256": {IMAGES_DIR: images.sha.hexdigest(), SAMPLES_DIR: samples.sha.hexdigest()},
        "skipped": [{"path": p, "reason": why} for p, why in report.skipped],
    }  # fmt: skip


def build(
    spec: BuildSpec, out: str | Path, spec_sha256: str = "", progress: bool = True
) -> BuildReport:
    """Build the store at `out` (replacing an existing one only on success)."""
    from datasets import disable_progress_bars

    from samed2_kit.medbank.schema import image_features, sample_features
    from samed2_kit.utils.atomic import atomic_path, write_text

    disable_progress_bars()  # ours (per source) is enough
    out = Path(out)
    report = BuildReport(str(out))
    t0 = time.perf_counter()
    counts: Counter = Counter()
    sources_info = []
    with atomic_path(out, directory=True) as tmp:
        images = _Table(tmp / "_shards_images", image_features(), "image")
        samples = _Table(tmp / "_shards_samples", sample_features(), "mask")
        n_slices = 0
        for si, src in enumerate(spec.sources):
            info, src_counts, src_slices = _add_source(
                src, si, spec, images, samples, report, progress
            )
            sources_info.append(info)
            counts.update(src_counts)
            n_slices += src_slices
        if samples.n == 0:
            raise ValueError(
                "nothing usable remains: every case was skipped:\n"
                + "\n".join(f"  {p}: {why}" for p, why in report.skipped)
            )
        images.finish(tmp / IMAGES_DIR)
        samples.finish(tmp / SAMPLES_DIR)
        report.images, report.samples = images.n, samples.n
        report.seconds = time.perf_counter() - t0
        report.slices_per_s = n_slices / max(report.seconds, 1e-9)
        manifest = _manifest(spec, spec_sha256, sources_info, counts, images, samples, report)
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        import shutil

        for shards in ("_shards_images", "_shards_samples"):
            shutil.rmtree(tmp / shards, ignore_errors=True)
    return report
