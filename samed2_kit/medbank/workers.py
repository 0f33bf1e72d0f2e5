"""One case into store rows (read, preprocess, slice, PNG-encode), in `num_proc` worker processes
when asked; results come back in case order, so the store is the same for every `num_proc`."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from samed2_kit.medbank.plan import CaseJob, slab_ranges
from samed2_kit.medbank.schema import FOV


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


@dataclass
class _Part:
    """Rows of one stored case; row references are relative to the part's first image/sample row."""

    case_id: str
    split: str
    images: list[dict]
    samples: list[dict]


@dataclass
class CaseResult:
    skipped: str | None = None  # the reason, when the case was skipped
    parts: list[_Part] = field(default_factory=list)
    n_slices: int = 0
    spacing_known: bool = True


def _part_rows(sliced, src, case_id: str, split: str, lo: int, hi: int, job: CaseJob) -> _Part:
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


def read_case(job: CaseJob) -> CaseResult:
    """Read, preprocess, slice and PNG-encode one source image (run in a worker process when
    `num_proc` > 1): its rows, or the reason it is skipped."""
    from samed2_kit.medbank.cases import load_case, slice_case

    ref, src = job.ref, job.src
    try:
        vol, segs = load_case(ref, src, job.names)
        sliced = slice_case(vol, segs, src, seed=job.seed)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        return CaseResult(skipped=str(e))
    if not sliced.samples:
        return CaseResult(skipped="no non-empty mask in this case")
    n = len(sliced.images)
    fov = getattr(sliced, "fov", None)
    if fov is not None and tuple(fov.shape) != tuple(sliced.images.shape[:3]):
        return CaseResult(
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
    return CaseResult(None, parts, n, bool(sliced.spacing_known))


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


def case_results(jobs: list[CaseJob], num_proc: int) -> Iterator[CaseResult]:
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
