"""A small synthetic medbank store (per :mod:`samed2_kit.medbank.schema`), for tests and benchmarks.

Volumes of ``n_slices`` grey slices: slice z has the constant value ``slice_value(z)`` plus a bright
bar (``PATTERN`` added) in the top-left quarter, so the slice index can be read back from the
pixels and a flip shows. Label "a" is a square that moves with z (every slice); label "b" a
square on slices 1 and 2 only (so those slices hold two labels and the others none of "b").
2D cases are RGB (200, 100, 50) + the bar, label "a" only, their own neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PATTERN = 40  # added to the top-left bar of every synthetic image
RGB = (200, 100, 50)  # base colour of the synthetic 2D cases
B_SLICES = (1, 2)  # slices with label "b"


@dataclass
class SyntheticCase:
    """One case: ``n_slices`` > 0 slices (0 means a single 2D RGB image), its split and modality."""

    name: str
    n_slices: int
    split: str = "train"
    modality: str = "ct"
    task: str = "organs"


DEFAULT_CASES = (
    SyntheticCase("vol0", 5, "train", "ct", "organs"),
    SyntheticCase("vol1", 5, "test", "mr", "organs"),
    SyntheticCase("img0", 0, "train", "us", "fetal_head"),
)


def slice_value(z: int) -> int:
    """Grey value (0-255) of slice ``z`` outside the bar: 20, 50, 80, 110, 140, then repeating."""
    return 20 + 30 * (z % 5)


def _png(arr: np.ndarray) -> bytes:
    import cv2

    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise RuntimeError("cv2.imencode failed on a synthetic image")
    return buf.tobytes()


def _image(z: int, hw: tuple[int, int], rgb: bool, noise: int, rng) -> np.ndarray:
    h, w = hw
    base = np.array(RGB if rgb else [slice_value(z)], np.int32).reshape(1, 1, -1)
    img = np.broadcast_to(base, (h, w, base.shape[2])).copy()
    img[: h // 2, : w // 4] += PATTERN
    if noise:
        img += rng.integers(0, noise + 1, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img if rgb else img[:, :, 0]


def _mask(label: str, z: int, n: int, hw: tuple[int, int]) -> np.ndarray | None:
    """(H, W) uint8 0/255 mask of ``label`` on slice z of n, or None where the label is absent."""
    h, w = hw
    side = max(3, min(h, w) // 4)
    m = np.zeros(hw, np.uint8)
    if label == "a":
        f = z / max(n - 1, 1)
        r0, c0 = h // 8 + int(f * h / 4), w // 8 + int(f * w / 2)
    elif z in B_SLICES and n > 1:
        r0, c0 = h - side - 2, w - side - 2
    else:
        return None
    m[r0 : r0 + side, c0 : c0 + side] = 255
    return m


def write_synthetic_store(
    out_dir: str | Path,
    cases: tuple[SyntheticCase, ...] = DEFAULT_CASES,
    hw: tuple[int, int] = (32, 40),
    clip_radius: int = 2,
    noise: int = 0,
    seed: int = 0,
) -> Path:
    """Write a store to ``out_dir`` (images/, samples/, manifest.json) and return its path.

    ``hw``: (H, W) px of every image; ``clip_radius`` R: neighbours z-R..z+R, edge slices repeated;
    ``noise``: add uniform integer noise 0..noise to the images (realistic PNG sizes for benches).
    """
    import datasets
    from datasets import Dataset

    from samed2_kit.medbank.schema import (
        IMAGES_DIR,
        MANIFEST,
        SAMPLES_DIR,
        SCHEMA_VERSION,
        image_features,
        sample_features,
    )

    out, rng = Path(out_dir), np.random.default_rng(seed)
    images: dict[str, list] = {k: [] for k in image_features()}
    samples: dict[str, list] = {k: [] for k in sample_features()}
    pending = []  # (sample row, case, z, label, image rows of the case, sample rows by (label, z))
    for case in cases:
        n, rgb = max(case.n_slices, 1), case.n_slices == 0
        case_id, spacing = f"synth/{case.name}", [2.5, 0.8, 0.8] if not rgb else [1.0, 0.5, 0.5]
        first_row = len(images["image"])
        for z in range(n):
            img = _image(z, hw, rgb, noise, rng)
            for key, value in dict(
                image={"bytes": _png(img), "path": None}, dataset="synth", case_id=case_id,
                slice_index=z, num_slices=n, spacing=spacing, original_size=list(hw),
                split=case.split,
            ).items():  # fmt: skip
                images[key].append(value)
        rows, by_key = list(range(first_row, first_row + n)), {}
        for z in range(n):
            for label_id, label in enumerate(("a", "b"), start=1):
                mask = _mask(label, z, n, hw)
                if mask is None:
                    continue
                by_key[(label, z)] = len(samples["mask"])
                pending.append((len(samples["mask"]), n, z, label, rows, by_key))
                for key, value in dict(
                    mask={"bytes": _png(mask), "path": None}, image_row=rows[z], neighbors=[],
                    neighbor_samples=[], label=label, label_id=label_id, modality=case.modality,
                    task=case.task, dataset="synth", case_id=case_id, slice_index=z,
                    mask_area=int((mask > 0).sum()), spacing=spacing, original_size=list(hw),
                    licence="CC0-1.0", split=case.split,
                ).items():  # fmt: skip
                    samples[key].append(value)
    for row, n, z, label, rows, by_key in pending:
        zs = [min(max(z + k, 0), n - 1) for k in range(-clip_radius, clip_radius + 1)]
        samples["neighbors"][row] = [rows[j] for j in zs]
        samples["neighbor_samples"][row] = [by_key.get((label, j), -1) for j in zs]
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        Dataset.from_dict(images, features=image_features()).save_to_disk(str(out / IMAGES_DIR))
        Dataset.from_dict(samples, features=sample_features()).save_to_disk(str(out / SAMPLES_DIR))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sources": ["synthetic"],
        "counts": {"images": len(images["image"]), "samples": len(samples["mask"])},
        "clip_radius": clip_radius,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
