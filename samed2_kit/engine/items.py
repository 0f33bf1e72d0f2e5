"""Evaluation items: one image + ground-truth mask at original resolution, with its spacing.

Provided from a medbank store split (what training and `samed2 eval` use). Where the store's
images/ table has a `fov` column (field of view, PNG 0/255), `EvalItem.load_valid` gives it;
evaluation zeroes prediction and ground truth outside it (`engine.evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class EvalItem:
    """`load()` -> (image (H, W) or (H, W, 3), mask (H, W) bool); spacing (row, col) in mm;
    `modality` as the store names it ("ct", "mr", "us", ...): it picks the NSD tolerance."""

    sample_id: str
    case_id: str
    task: str
    label: str
    spacing: tuple[float, float]
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    intensity: str = "2d"
    window: tuple[float, float] | None = None
    modality: str = "unknown"
    spacing_known: bool = True  # False: spacing is 1 per pixel, distances in px
    # load_clip(T) -> (T, H, W[, 3]) the T adjacent slices around the image (the image at T // 2),
    # for models with temporal adapters; None: the image alone
    load_clip: Callable[[int], np.ndarray] | None = None
    # load_valid() -> (H, W) bool field of view (True inside) or None (no FOV: every pixel
    # counts); None: the item has no FOV
    load_valid: Callable[[], np.ndarray | None] | None = None


def fov_array(cell) -> np.ndarray | None:
    """A decoded `fov` cell (PIL image or array, 0/255 grey or RGB; bool) -> (H, W) bool,
    True inside the field of view (> 127); None for None (the image has no FOV)."""
    if cell is None:
        return None
    arr = np.asarray(cell)
    arr = arr[..., 0] if arr.ndim == 3 else arr
    return arr if arr.dtype == bool else arr > 127


def items_from_store(
    store: str, split: str, tasks: list[str] | None = None, max_items: int | None = None
) -> list[EvalItem]:
    """From a medbank store split: images are stored preprocessed (8-bit), masks 0/255; at most
    `max_items` per task (the first, in store order), so a large store costs only what is used."""
    from samed2_kit.medbank.store import open_store, spacing_unknown

    manifest, images, samples = open_store(store)
    fovs = images.select_columns(["fov"]) if "fov" in images.column_names else None
    images = images.select_columns(["image"])  # decoding a row decodes only its image
    unknown = spacing_unknown(manifest)
    cols = samples.select_columns(["split", "task", "mask_area"]).to_dict()  # columns, not rows
    rows = [
        i for i, (sp, task, area) in enumerate(zip(*cols.values(), strict=True))
        if sp == split and area > 0 and (tasks is None or task in tasks)
    ]  # fmt: skip
    if not rows:
        raise ValueError(_no_items_message(store, split, tasks, cols))
    if max_items is not None:  # the first of each task, as `rows.limit_per_task` keeps
        seen: dict[str, int] = {}
        kept = []
        for r in rows:
            seen[cols["task"][r]] = seen.get(cols["task"][r], 0) + 1
            if seen[cols["task"][r]] <= max_items:
                kept.append(r)
        rows = kept
    names = ["image_row", "case_id", "task", "label", "slice_index", "spacing", "modality",
             "neighbors"]  # fmt: skip
    table = samples.select(rows).select_columns(names).to_dict()
    meta = [dict(zip(names, values, strict=True)) for values in zip(*table.values(), strict=True)]

    def loader(sample_row: int, image_row: int):
        def load():
            img = np.asarray(images[image_row]["image"])
            mask = np.asarray(samples[sample_row]["mask"])
            return img, (mask[..., 0] if mask.ndim == 3 else mask) > 127

        return load

    def fov_loader(image_row: int):
        def load_valid():
            return fov_array(fovs[image_row]["fov"])

        return load_valid

    def clip_loader(neighbors: list[int], where: str):
        def load_clip(t: int) -> np.ndarray:
            start = len(neighbors) // 2 - t // 2
            if start < 0:
                raise ValueError(
                    f"store {store}, {where}: the store keeps {len(neighbors) // 2} neighbouring "
                    f"slices on each side, the model's clips need {t // 2}: rebuild the store "
                    f"with clip_radius >= {t // 2}"
                )
            return np.stack([np.asarray(images[r]["image"]) for r in neighbors[start : start + t]])

        return load_clip

    out = []
    for row, m in zip(rows, meta, strict=True):
        # the sample row makes ids unique where one case has several 2D images (hc18 010, 010_2)
        sid = f"{m['case_id']}#{m['label']}@{m['slice_index']}/{row}"
        out.append(
            EvalItem(sid, m["case_id"], m["task"], m["label"], tuple(m["spacing"][1:]),
                     loader(row, m["image_row"]), modality=m["modality"],
                     load_clip=clip_loader(m["neighbors"], sid),
                     spacing_known=m["case_id"] not in unknown,
                     load_valid=None if fovs is None else fov_loader(m["image_row"]))
        )  # fmt: skip
    return out


def _no_items_message(store: str, split: str, tasks: list[str] | None, cols) -> str:
    """Why a split gave no items: it is absent (name those present) or holds none of `tasks`."""
    splits = sorted(set(cols["split"]))
    if split not in splits:
        return (
            f"store {store} has no split {split!r}; its splits are {', '.join(splits)} "
            "(choose one of them)"
        )
    found = sorted({t for s, t in zip(cols["split"], cols["task"], strict=True) if s == split})
    if tasks is None:
        return f"store {store}: every mask in split {split!r} is empty (tasks {', '.join(found)})"
    return (
        f"store {store} has no non-empty samples of tasks {tasks} in split {split!r}; "
        f"that split holds tasks {', '.join(found)} (set data.tasks accordingly)"
    )


def supports_from_store(
    store: str, split: str, tasks: list[str] | None, n: int = 1
) -> dict[str, list[EvalItem]]:
    """Support examples for few-shot evaluation: per task, the first `n` non-empty items of
    `split` from distinct cases (store order), so the same supports serve every run."""
    out: dict[str, list[EvalItem]] = {}
    for it in items_from_store(store, split, tasks):
        chosen = out.setdefault(it.task, [])
        if len(chosen) < n and all(c.case_id != it.case_id for c in chosen):
            chosen.append(it)
    return out


def model_supports(model, store: str, split: str, tasks: list[str] | None, n: int):
    """`supports_from_store` for a model with a source that reads supports, else None."""
    if not model.support_sources():
        return None
    return supports_from_store(store, split, tasks, n)
