"""Volume evaluation: one object through a whole volume, scored in 3D with the voxel spacing.

Protocol `slice-box`: the object's tight box on its key slice (the slice where its mask is
largest; the first on ties) prompts `propagate_volume`, which runs both ways through the
volume's slices. The baseline of every row is that box extruded over the slices where the
object is present (what a reader gets from the box alone). Dice, NSD and HD95 are computed on
the (Z, H, W) masks with the (z, y, x) spacing in mm (`metrics.case_metrics`).

Volumes come from a medbank store: per (case, label), the slices stored for the case (the
object's slices and `clip_radius` slices around them), as the 8-bit images training saw, with
the object's masks (empty where the store has none). A store of 2D images has no volumes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

VOLUME_PROTOCOLS = ("slice-box",)


@dataclass
class VolumeItem:
    """One object in one volume. `load()` -> (images (Z, H, W) uint8, masks (Z, H, W) bool);
    spacing (z, y, x) in mm; `z0`: the source slice index of row 0."""

    sample_id: str
    case_id: str
    task: str
    label: str
    modality: str
    spacing: tuple[float, float, float]
    z0: int
    load_volume: Callable[[], tuple[np.ndarray, np.ndarray]]
    intensity: str = "2d"  # the stored slices are 8-bit, as training saw them
    window: tuple[float, float] | None = None
    key: int | None = None  # the key slice (row of the volume), set by `load`

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """The key slice (image, mask): what 2D reports (overlays) show of a volume."""
        images, masks = self.load_volume()
        self.key = key_slice(masks)
        return images[self.key], masks[self.key]


def key_slice(masks: np.ndarray) -> int:
    """The slice (axis 0) where the object's area is largest (the first on ties)."""
    return int(np.argmax(masks.reshape(len(masks), -1).sum(axis=1)))


def extruded_box(masks: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(Z, H, W) bool: the xyxy `box` (max-index convention) filled on every slice where the
    object is present, empty elsewhere."""
    out = np.zeros(masks.shape, dtype=bool)
    present = masks.reshape(len(masks), -1).any(axis=1)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    out[present, y0 : y1 + 1, x0 : x1 + 1] = True
    return out


def _contiguous(zs: list[int], around: int) -> list[int]:
    """The run of consecutive slice indices in `zs` that contains `around`."""
    run = [around]
    while run[0] - 1 in zs:
        run.insert(0, run[0] - 1)
    while run[-1] + 1 in zs:
        run.append(run[-1] + 1)
    return run


def volumes_from_store(store: str, split: str, tasks: list[str] | None = None) -> list[VolumeItem]:
    """Every (case, label) of `split` as a VolumeItem (see the module docstring)."""
    from samed2_kit.medbank.store import open_store

    _, images, samples = open_store(store)
    names = ["split", "task", "case_id", "label", "slice_index", "mask_area"]
    cols = samples.select_columns(names).to_dict()
    objects: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}
    for row, (sp, task, case, label, z, area) in enumerate(zip(*cols.values(), strict=True)):
        if sp == split and (tasks is None or task in tasks):
            objects.setdefault((case, label), {})[z] = (row, area)
    if not objects:
        raise ValueError(f"store {store} has no samples in split {split!r} for tasks {tasks}")
    icols = images.select_columns(["case_id", "slice_index", "num_slices"]).to_dict()
    slices: dict[str, dict[int, int]] = {}
    for row, (case, z) in enumerate(zip(icols["case_id"], icols["slice_index"], strict=True)):
        slices.setdefault(case, {})[z] = row
    if all(n == 1 for n in icols["num_slices"]):
        raise ValueError(
            f"store {store} holds 2D images only, so it has no volumes: use a 2D protocol "
            "(box, point, box+clicks) or build the store from NIfTI/NRRD/DICOM volumes"
        )
    return [
        _item(images, samples, key, rows, slices[key[0]]) for key, rows in sorted(objects.items())
    ]


def _item(images, samples, key, found: dict[int, tuple[int, int]], slices: dict[int, int]):
    """The VolumeItem of one (case, label): `found` {z: (sample row, mask area)}, `slices` {z:
    image row} of the case; the volume is the run of stored slices around the largest mask."""
    case, label = key
    rows = {z: row for z, (row, _) in found.items()}
    first = samples.select_columns(["task", "modality", "spacing"])[next(iter(rows.values()))]
    zs = _contiguous(sorted(slices), max(found, key=lambda z: (found[z][1], -z)))

    def load() -> tuple[np.ndarray, np.ndarray]:
        imgs = np.stack([np.asarray(images[slices[z]]["image"]) for z in zs])
        h, w = imgs.shape[1:3]
        masks = np.zeros((len(zs), h, w), dtype=bool)
        for i, z in enumerate(zs):
            if z in rows:
                m = np.asarray(samples[rows[z]]["mask"])
                masks[i] = (m[..., 0] if m.ndim == 3 else m) > 127
        return imgs, masks

    return VolumeItem(f"{case}#{label}", case, first["task"], label, first["modality"],
                      tuple(float(v) for v in first["spacing"]), zs[0], load)  # fmt: skip


def evaluate_volume(model, item: VolumeItem, cfg) -> tuple:
    """One VolumeItem under `slice-box`: (CaseRow, predicted (Z, H, W) bool); None when the
    object is absent from every slice."""
    from samed2_kit.engine.rows import CaseRow
    from samed2_kit.metrics import case_metrics
    from samed2_kit.prompts import Prompt, box_from_mask
    from samed2_kit.volume import propagate_volume

    images, gt = item.load_volume()
    if images.ndim != 3:
        raise ValueError(f"{item.sample_id}: volume evaluation takes grey volumes (Z, H, W), "
                         f"got {images.shape}")  # fmt: skip
    if not gt.any():
        return None
    z = key_slice(gt)
    box = box_from_mask(gt[z])
    pred = propagate_volume(model, images, {z: Prompt(box=box)}, modality="2d")
    tol = cfg.nsd_tolerance(item.modality)
    m = case_metrics(pred, gt, item.spacing, tol)
    b = case_metrics(extruded_box(gt, box), gt, item.spacing, tol)
    row = CaseRow(item.sample_id, item.case_id, item.task, item.label, item.modality,
                  m.dice, m.nsd, m.hd95, b.dice, b.nsd, b.hd95)  # fmt: skip
    return row, pred


def evaluate_volumes(model, items: list[VolumeItem], cfg, progress: bool = True):
    """Rows and predictions of every item (None results dropped), in input order."""
    from tqdm.auto import tqdm

    from samed2_kit.engine.rows import limit_per_task

    rows, preds = [], []
    for item in tqdm(limit_per_task(items, cfg.max_items), desc=f"eval ({cfg.prompt})",
                     disable=not progress):  # fmt: skip
        out = evaluate_volume(model, item, cfg)
        if out is not None:
            rows.append(out[0])
            preds.append(out[1])
    return rows, preds
