"""`medbank build`: curate sources into one store (see `schema.py` for its layout).

Cases are split by case id per source (seeded) before any pixel is read (sources joined by
`case_from` are split together; a `split_by: slab` source cuts each volume into contiguous slabs,
one per split); each case is read, preprocessed, sliced and PNG-encoded, by `num_proc` worker
processes when asked, and written in case order, so the store is the same for every `num_proc`. A
case that fails is skipped with its reason in the report and the manifest. The store is built in a
temporary folder and renamed into place at the end, so a failed or interrupted build leaves
nothing behind (and the next build removes what a killed one left).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from samed2_kit.medbank.schema import IMAGES_DIR, MANIFEST, SAMPLES_DIR, SCHEMA_VERSION
from samed2_kit.medbank.spec import BuildSpec, SourceSpec

FOV = "fov"  # optional image column (see schema.py)


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


def _png_bytes(value) -> bytes | None:
    """The PNG bytes of an image cell: raw bytes, a {"bytes", "path"} dict, or None."""
    return value["bytes"] if isinstance(value, dict) else value


def row_digest(row: dict, image_key: str) -> bytes:
    """What a row contributes to its table's content hash: its PNG bytes, its field-of-view PNG
    bytes when it has one (a missing or None `fov` adds nothing, so stores without one hash as
    before the column existed) and its other fields."""
    rest = json.dumps(
        {k: v for k, v in row.items() if k not in (image_key, FOV)}, sort_keys=True, default=str
    )
    out = (
        hashlib.sha256(_png_bytes(row[image_key])).digest() + hashlib.sha256(rest.encode()).digest()
    )
    fov = _png_bytes(row.get(FOV))
    if fov is not None:
        out += hashlib.sha256(b"fov" + fov).digest()
    return out


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
        for key in (self.key, FOV):
            if row.get(key) is not None:
                row[key] = {"bytes": row[key], "path": None}
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


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of `n` units each split gets: floor of fraction * n, the rest by largest remainder,
    and at least one for every split with a fraction > 0 when `n` allows (the rule of
    `pairs.split_by_case`)."""
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


def slab_ranges(zs: list[int], n: int, fractions: dict[str, float]) -> list[tuple[str, int, int]]:
    """Cut a volume of `n` slices into contiguous slabs, one per split in the order of `fractions`
    (train, then val, then test): [(split, first slice, end slice (exclusive))].

    The cut is made over `zs`, the sorted slices that hold samples, so each split gets its fraction
    of the labelled slices (at least one each where the fraction > 0 and there are enough); the
    slices before the first and after the last labelled slice go to the first and last slab. A
    split that gets no labelled slice gets no slab."""
    counts = split_counts(len(zs), fractions)
    firsts, at = [], 0
    for k in fractions:
        if counts[k] > 0:
            firsts.append((k, zs[at]))
            at += counts[k]
    return [
        (k, 0 if i == 0 else z0, firsts[i + 1][1] if i + 1 < len(firsts) else n)
        for i, (k, z0) in enumerate(firsts)
    ]


@dataclass
class _CaseJob:
    """What a worker needs to turn one source image into rows (picklable)."""

    src: SourceSpec
    ref: object  # layouts.CaseRef
    names: dict[int, str]
    seed: int
    case_id: str  # "<namespace>/<case>"; "@<split>" is appended per slab
    split: str | None  # None: split_by slab, cut with `fractions`
    fractions: dict[str, float]
    clip_radius: int
    max_size: int | None


@dataclass
class _Part:
    """Rows of one stored case; row references are relative to the part's first image/sample row."""

    case_id: str
    split: str
    images: list[dict]
    samples: list[dict]


@dataclass
class _CaseResult:
    skipped: str | None = None  # the reason, when the case was skipped
    parts: list[_Part] = field(default_factory=list)
    n_slices: int = 0
    spacing_known: bool = True


def _part_rows(sliced, src, case_id: str, split: str, lo: int, hi: int, job: _CaseJob) -> _Part:
    """The image and sample rows of slices [lo, hi) of a sliced case; neighbours are clamped to
    [lo, hi) (the volume's ends, or a slab's)."""
    r, max_size = job.clip_radius, job.max_size
    kept = [s for s in sliced.samples if lo <= s[2] < hi]
    zs = sorted({z for _, _, z, _ in kept})

    def clamp(z: int) -> int:
        return min(max(z, lo), hi - 1)

    needed = sorted({clamp(z + d) for z in zs for d in range(-r, r + 1)})
    h, w = sliced.images.shape[1:3]
    sh, sw = _resize(np.zeros((h, w), np.uint8), True, max_size).shape
    # in-plane spacing of the stored (possibly downscaled) pixels; float32 as stored, for hashing
    spacing = [
        float(np.float32(v))
        for v in (sliced.spacing[0], sliced.spacing[1] * h / sh, sliced.spacing[2] * w / sw)
    ]
    fov = getattr(sliced, "fov", None)
    image_row, images = {}, []
    for z in needed:
        img = sliced.images[z]
        image_row[z] = len(images)
        view = (
            None
            if fov is None
            else encode_png(_resize(fov[z].astype(np.uint8) * 255, True, max_size))
        )
        images.append({
            "image": encode_png(_resize(img, False, max_size)), "dataset": src.name,
            "case_id": case_id, "slice_index": z, "num_slices": hi - lo, "spacing": spacing,
            "original_size": list(img.shape[:2]), "split": split, FOV: view,
        })  # fmt: skip
    # sample rows are numbered before they are written, so neighbours can point at each other
    row_of = {(lab, z): i for i, (lab, _, z, _) in enumerate(kept)}
    samples = []
    for lab, name, z, mask in kept:
        near = [clamp(z + d) for d in range(-r, r + 1)]
        stored = _resize(mask.astype(np.uint8) * 255, True, max_size)
        samples.append({
            "mask": encode_png(stored),
            "image_row": image_row[z], "neighbors": [image_row[k] for k in near],
            "neighbor_samples": [row_of.get((lab, k), -1) for k in near],
            "label": name, "label_id": lab, "modality": src.modality, "task": src.task,
            "dataset": src.name, "case_id": case_id, "slice_index": z,
            "mask_area": int((stored > 0).sum()), "spacing": spacing,
            "original_size": list(mask.shape[:2]), "licence": src.licence, "split": split,
        })  # fmt: skip
    return _Part(case_id, split, images, samples)


def read_case(job: _CaseJob) -> _CaseResult:
    """Read, preprocess, slice and PNG-encode one source image (run in a worker process when
    `num_proc` > 1): its rows, or the reason it is skipped."""
    from samed2_kit.medbank.cases import load_case, slice_case

    ref, src = job.ref, job.src
    try:
        vol, segs = load_case(ref, src, job.names)
        sliced = slice_case(vol, segs, src, seed=job.seed)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        return _CaseResult(skipped=str(e))
    if not sliced.samples:
        return _CaseResult(skipped="no non-empty mask in this case")
    n = len(sliced.images)
    fov = getattr(sliced, "fov", None)
    if fov is not None and tuple(fov.shape) != tuple(sliced.images.shape[:3]):
        return _CaseResult(
            skipped=f"field of view is {tuple(fov.shape)} (slices, H, W), the image "
            f"{tuple(sliced.images.shape[:3])}: give a fov mask of the image's size"
        )
    if job.split is not None:
        ranges = [(job.split, 0, n)]
        ids = [job.case_id]
    else:
        zs = sorted({z for _, _, z, _ in sliced.samples})
        ranges = slab_ranges(zs, n, job.fractions)
        ids = [f"{job.case_id}@{k}" for k, _, _ in ranges]
    parts = [
        _part_rows(sliced, src, cid, k, lo, hi, job)
        for cid, (k, lo, hi) in zip(ids, ranges, strict=True)
    ]
    return _CaseResult(None, parts, n, bool(sliced.spacing_known))


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the build was killed: don't linger as an orphan
            os._exit(1)


def _worker_init(parent: int) -> None:
    """Workers leave Ctrl-C to the parent (which stops them) and exit when it is gone."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _results(jobs: list[_CaseJob], num_proc: int) -> Iterator[_CaseResult]:
    """`read_case` of every job, in job order; by `num_proc` spawned workers when > 1, with at
    most 2 * num_proc cases in flight (bounded memory). A worker that dies (killed, out of
    memory, or unable to start) is a ValueError, never a hang."""
    if num_proc <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield read_case(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")  # no fork of a parent holding threads or torch
    procs = min(num_proc, len(jobs))
    pool = ProcessPoolExecutor(procs, ctx, initializer=_worker_init, initargs=(os.getpid(),))
    done = False
    try:
        todo = iter(jobs)
        pending = deque(pool.submit(read_case, j) for j in islice(todo, 2 * procs))
        while pending:
            try:
                result = pending.popleft().result()
            except BrokenProcessPool as e:
                raise ValueError(
                    f"--num-proc {num_proc}: a worker process died ({e}); it may have run out of "
                    "memory, or could not start (a script calling build(num_proc > 1) needs an "
                    "`if __name__ == '__main__':` guard): use fewer processes or --num-proc 1"
                ) from e
            for job in islice(todo, 1):
                pending.append(pool.submit(read_case, job))
            yield result
        done = True
    finally:
        pool.shutdown(wait=done, cancel_futures=True)
        if not done:  # an error or Ctrl-C here: stop the workers now, not after their cases
            workers = list((getattr(pool, "_processes", None) or {}).values())
            for w in workers:
                w.terminate()
            for w in workers:
                w.join()


def _namespaces(spec: BuildSpec) -> dict[str, str]:
    """Source name -> the source whose case ids (and split) it shares: itself, or the root of its
    `case_from` chain. ValueError for a combination the build cannot honour."""
    by_name = {s.name: (i, s) for i, s in enumerate(spec.sources)}
    root: dict[str, str] = {}
    for i, s in enumerate(spec.sources):
        if not s.case_from:
            root[s.name] = s.name
            continue
        other = by_name.get(s.case_from)
        if other is None or other[0] >= i:
            raise ValueError(
                f"source {s.name!r} case_from={s.case_from!r}: name a source listed before it "
                f"({[x.name for x in spec.sources[:i]] or 'none'})"
            )
        o = other[1]
        if "slab" in (s.split_by, o.split_by):
            raise ValueError(
                f"source {s.name!r} case_from={s.case_from!r}: split_by slab cuts volumes into "
                "slabs, so its cases cannot be shared: drop case_from or use split_by: case"
            )
        root[s.name] = root[o.name]
        mine, theirs = s.split, by_name[root[s.name]][1].split or spec.split
        if mine is not None and dict(mine) != dict(theirs):
            raise ValueError(
                f"source {s.name!r}: split {mine} differs from {root[s.name]!r}'s {theirs}, with "
                "which it shares cases (case_from): drop this source's split"
            )
    return root


def check_out(out: Path) -> None:
    """ValueError before any work when `out` cannot become the store: an existing file, or a
    folder holding files that is not a store (never replace a user's folder)."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is a file; give a folder (a new one, or a store to replace)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(
            f"--out {out} is a folder with files that is not a medbank store (no {MANIFEST}); "
            "give a new or empty folder, or an existing store to replace"
        )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder; give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent}; give a folder you can write")


@dataclass
class _SourcePlan:
    src: SourceSpec
    si: int
    refs: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _plan(src: SourceSpec, si: int, report: BuildReport) -> _SourcePlan:
    """Enumerate a source's cases (no pixels read); a source that cannot be enumerated is
    skipped with its reason."""
    from samed2_kit.medbank.layouts import enumerate_cases, label_names

    info = {"name": src.name, "layout": src.layout, "root": src.root, "modality": src.modality,
            "task": src.task, "licence": src.licence, "cases": 0, "images": 0, "samples": 0,
            "skipped": 0, "spacing_unknown": []}  # fmt: skip
    if src.case_from:
        info["case_from"] = src.case_from
    if src.split_by != "case":
        info["split_by"] = src.split_by
    plan = _SourcePlan(src, si, info=info)
    try:
        plan.refs, skipped = enumerate_cases(src)
        plan.names = label_names(src)
    except (ValueError, FileNotFoundError, KeyError) as e:
        plan.refs = []
        report.skipped.append((src.root, str(e)))
        info["skipped"] += 1
        return plan
    report.skipped += skipped
    info["skipped"] += len(skipped)
    return plan


def _jobs(plans: list[_SourcePlan], spec: BuildSpec, root: dict[str, str]) -> list[_CaseJob]:
    """One job per source image, in source then case order; the split of every case decided here
    (jointly for sources that share case ids)."""
    from samed2_kit.medbank.pairs import split_by_case

    by_name = {p.src.name: p for p in plans}
    fractions = {p.src.name: dict(by_name[root[p.src.name]].src.split or spec.split) for p in plans}
    pooled: dict[str, list] = {}
    for p in plans:
        if p.src.split_by == "case":
            pooled.setdefault(root[p.src.name], []).extend(p.refs)
    split_of = {
        name: {r.case_id: k for k, rs in split_by_case(refs, fractions[name], spec.seed).items() for r in rs}
        for name, refs in pooled.items()
    }  # fmt: skip
    jobs = []
    for p in plans:
        name, ns = p.src.name, root[p.src.name]
        for ci, ref in enumerate(p.refs):
            jobs.append(_CaseJob(
                p.src, ref, p.names, seed=spec.seed * 1_000_003 + p.si * 10_007 + ci,
                case_id=f"{ns}/{ref.case_id}",
                split=split_of[ns][ref.case_id] if p.src.split_by == "case" else None,
                fractions=fractions[name], clip_radius=spec.clip_radius, max_size=spec.max_size,
            ))  # fmt: skip
    return jobs


def _write(result: _CaseResult, images: _Table, samples: _Table) -> None:
    """Append a case's parts, turning their relative row references into store rows."""
    for part in result.parts:
        ib, sb = images.n, samples.n
        for row in part.images:
            images.add(row)
        for row in part.samples:
            row["image_row"] += ib
            row["neighbors"] = [ib + k for k in row["neighbors"]]
            row["neighbor_samples"] = [sb + k if k >= 0 else -1 for k in row["neighbor_samples"]]
            samples.add(row)


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
    spec: BuildSpec,
    out: str | Path,
    spec_sha256: str = "",
    progress: bool = True,
    num_proc: int = 1,
) -> BuildReport:
    """Build the store at `out` (replacing an existing store only on success).

    Args:
        spec: the validated spec (`spec.load_spec`).
        out: the store folder: new, empty, or an existing store (a file, or a folder of other
            files, is refused before any work).
        spec_sha256: the spec file's hash, recorded in the manifest.
        progress: one progress bar per source.
        num_proc: worker processes reading and encoding cases (spawned, so a script calling this
            with num_proc > 1 needs the usual `if __name__ == "__main__":` guard); the store's
            content is identical for every value.
    """
    import shutil
    from contextlib import closing

    from datasets import disable_progress_bars
    from tqdm.auto import tqdm

    from samed2_kit.medbank.schema import image_features, sample_features
    from samed2_kit.utils.atomic import atomic_path, remove_stale, write_text

    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"--num-proc {num_proc!r}: give a whole number of processes >= 1")
    out = Path(out)
    remove_stale(out)  # what a killed build of this store left
    check_out(out)
    root = _namespaces(spec)
    disable_progress_bars()  # ours (per source) is enough
    report = BuildReport(str(out))
    t0 = time.perf_counter()
    counts: Counter = Counter()
    with atomic_path(out, directory=True) as tmp:
        images = _Table(tmp / "_shards_images", image_features(fov=True), "image")
        samples = _Table(tmp / "_shards_samples", sample_features(), "mask")
        plans = [_plan(src, si, report) for si, src in enumerate(spec.sources)]
        jobs = _jobs(plans, spec, root)
        n_slices = 0
        with closing(_results(jobs, num_proc)) as results:
            for p in plans:
                info, cases = p.info, set()
                for ref in tqdm(p.refs, desc=f"build {p.src.name}", disable=not progress):
                    res = next(results)
                    if res.skipped is not None:
                        report.skipped.append((ref.image, res.skipped))
                        info["skipped"] += 1
                        continue
                    _write(res, images, samples)
                    for part in res.parts:
                        if not res.spacing_known and part.case_id not in info["spacing_unknown"]:
                            info["spacing_unknown"].append(part.case_id)  # metrics in pixels
                        cases.add(part.case_id)
                        info["samples"] += len(part.samples)
                        counts[(p.src.modality, p.src.task, part.split)] += len(part.samples)
                    n_slices += res.n_slices
                    info["images"] += 1
                info["cases"] = len(cases)
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
        manifest = _manifest(
            spec, spec_sha256, [p.info for p in plans], counts, images, samples, report
        )
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        for shards in ("_shards_images", "_shards_samples"):
            shutil.rmtree(tmp / shards, ignore_errors=True)
    return report
