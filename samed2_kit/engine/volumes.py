"""Volume evaluation: one object through a whole volume, scored in 3D with the voxel spacing.

Protocol `slice-box`: the object's tight box on its key slice (the slice where its mask is
largest; the first on ties) prompts `propagate_volume`, which runs both ways through the
volume's slices. The baseline of every row is that box extruded over the slices where the
object is present (what a reader gets from the box alone). Dice, NSD and HD95 are computed on
the (Z, H, W) masks with the (z, y, x) spacing in mm (`metrics.case_metrics`).

Protocol `slice-box+clicks`: then up to K corrective clicks (`eval.clicks`) placed in 3D: at
the innermost voxel (distances in mm) of the largest face-connected error region of the volume
(false negatives first on equal sizes), positive on a false negative, negative on a false
positive; the click joins the prompt of its slice (with the box on the key slice), which also
takes the slice's current mask as the decoder's mask input (SAM 2's refinement of a tracked
frame), and the whole volume is propagated again from every prompted slice (a slice between two
takes the nearer one's pass). The row holds the 3D Dice after the box and after every click and its normalised area
(`dice_auc`, the CVPR 2025 interactive 3D challenge's protocol), and the final metrics.

Protocol `box-per-slice`: every slice where the object is present gets its own tight box and is
decoded from its clip of T slices, without propagation (the temporal adapter's own evaluation);
the other slices stay empty.

Volumes come from a medbank store: per (case, label), the slices stored for the case (the
object's slices and `clip_radius` slices around them), as the 8-bit images training saw, with
the object's masks (empty where the store has none). A store of 2D images has no volumes.

Field of view: where the store's images/ table has a `fov` column and some slice of the volume
has one (`VolumeItem.load_valid`; a slice without counts whole), the ground truth, every
prediction (clicks are placed inside it) and the baseline are zeroed outside it before metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


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
    spacing_known: bool = True  # False: spacing is 1 per pixel, distances in px
    # load_valid() -> (Z, H, W) bool field of view, or None (every voxel counts)
    load_valid: Callable[[], np.ndarray | None] | None = None

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
    from samed2_kit.medbank.store import open_store, spacing_unknown

    manifest, images, samples = open_store(store)
    # keyed by (dataset, case): sources sharing case ids (`case_from`) store their own slices
    names = ["split", "task", "dataset", "case_id", "label", "slice_index", "mask_area"]
    cols = samples.select_columns(names).to_dict()
    objects: dict[tuple[str, str, str], dict[int, tuple[int, int]]] = {}
    for row, (sp, task, src, case, label, z, area) in enumerate(zip(*cols.values(), strict=True)):
        if sp == split and (tasks is None or task in tasks):
            objects.setdefault((src, case, label), {})[z] = (row, area)
    if not objects:
        raise ValueError(f"store {store} has no samples in split {split!r} for tasks {tasks}")
    icols = images.select_columns(["dataset", "case_id", "slice_index", "num_slices"]).to_dict()
    slices: dict[tuple[str, str], dict[int, int]] = {}
    keys = zip(icols["dataset"], icols["case_id"], icols["slice_index"], strict=True)
    for row, (src, case, z) in enumerate(keys):
        slices.setdefault((src, case), {})[z] = row
    if all(n == 1 for n in icols["num_slices"]):
        raise ValueError(
            f"store {store} holds 2D images only, so it has no volumes: use a 2D protocol "
            "(box, point, box+clicks) or build the store from NIfTI/NRRD/DICOM volumes"
        )
    unknown = spacing_unknown(manifest)
    items = [
        _item(images, samples, key[1:], rows, slices[key[:2]])
        for key, rows in sorted(objects.items())
    ]
    for it in items:
        it.spacing_known = it.case_id not in unknown
    return items


def _item(images, samples, key, found: dict[int, tuple[int, int]], slices: dict[int, int]):
    """The VolumeItem of one (case, label): `found` {z: (sample row, mask area)}, `slices` {z:
    image row} of the case; the volume is the run of stored slices around the largest mask."""
    from samed2_kit.engine.items import fov_array

    case, label = key
    rows = {z: row for z, (row, _) in found.items()}
    first = samples.select_columns(["task", "modality", "spacing"])[next(iter(rows.values()))]
    zs = _contiguous(sorted(slices), max(found, key=lambda z: (found[z][1], -z)))
    fovs = images.select_columns(["fov"]) if "fov" in images.column_names else None
    images = images.select_columns(["image"])  # decoding a row decodes only its image

    def load_valid() -> np.ndarray | None:
        cells = [fov_array(fovs[slices[z]]["fov"]) for z in zs]
        if all(c is None for c in cells):
            return None
        shape = next(c.shape for c in cells if c is not None)
        return np.stack([np.ones(shape, bool) if c is None else c for c in cells])

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
                      tuple(float(v) for v in first["spacing"]), zs[0], load,
                      load_valid=None if fovs is None else load_valid)  # fmt: skip


def _slice_box(model, images, gt, box, z, cfg, spacing, valid=None):
    """`slice-box`: the key slice's box, propagated both ways; no click curve."""
    from samed2_kit.prompts import Prompt
    from samed2_kit.volume import propagate_volume

    return propagate_volume(model, images, {z: Prompt(box=box)}, modality="2d"), []


def _slice_box_clicks(model, images, gt, box, z, cfg, spacing, valid=None):
    """`slice-box+clicks`: `slice-box`, then up to `cfg.clicks` corrective clicks in 3D, each
    re-propagating from its slice; the 3D Dice after the box and after every click. `valid`
    (Z, H, W) bool field of view: predictions zeroed outside it, so clicks land inside."""
    from samed2_kit.engine.click_rule import dice, largest_error
    from samed2_kit.prompts import Prompt
    from samed2_kit.volume import propagate_volume

    prompts = {z: {"box": box}}
    pred = propagate_volume(model, images, {z: Prompt(box=box)}, modality="2d")
    pred = pred if valid is None else pred & valid
    curve = [dice(pred, gt)]
    for _ in range(cfg.clicks):
        found = largest_error(pred, gt, spacing)
        if found is None:  # nothing left to correct: the last Dice holds
            curve += [curve[-1]] * (cfg.clicks + 1 - len(curve))
            break
        (zc, y, x), positive = found
        p = prompts.setdefault(zc, {})
        p["points"] = [*p.get("points", []), (x, y)]
        p["labels"] = [*p.get("labels", []), int(positive)]
        p["mask_input"] = pred[zc]  # the slice's current mask, refined by its clicks
        asked = {k: Prompt(box=v.get("box"), points=np.array(v["points"], np.float32)
                           if "points" in v else None,
                           labels=np.array(v["labels"]) if "labels" in v else None,
                           mask_input=v.get("mask_input"))
                 for k, v in prompts.items()}  # fmt: skip
        pred = propagate_volume(model, images, asked, modality="2d")
        pred = pred if valid is None else pred & valid
        curve.append(dice(pred, gt))
    return pred, curve


def _box_per_slice(model, images, gt, box, z, cfg, spacing, valid=None):
    """`box-per-slice`: every slice where the object is present gets its own tight box,
    decoded from its clip of T slices, without propagation; the other slices stay empty."""
    from samed2_kit.prompts import Prompt, box_from_mask
    from samed2_kit.volume import propagate_volume

    prompts = {k: Prompt(box=box_from_mask(gt[k])) for k in np.flatnonzero(gt.any(axis=(1, 2)))}
    return propagate_volume(model, images, prompts, modality="2d", direction="none"), []


# volume protocols, by name (`eval.prompt`): f(model, images (Z, H, W) uint8, gt (Z, H, W) bool,
# key box (4,), key slice z, EvalConfig, spacing (z, y, x) mm[, valid=(Z, H, W) bool field of
# view, given only when the volume has one]) -> (prediction (Z, H, W) bool, the per-click 3D
# Dice curve or []); `evaluate_volume` zeroes the prediction outside the FOV afterwards
VOLUME_PROTOCOLS = {"slice-box": _slice_box, "slice-box+clicks": _slice_box_clicks,
                    "box-per-slice": _box_per_slice}  # fmt: skip


def evaluate_volume(model, item: VolumeItem, cfg) -> tuple:
    """One VolumeItem under `cfg.prompt` (a VOLUME_PROTOCOLS name): (CaseRow, predicted
    (Z, H, W) bool); None when the object is absent from every slice. The row's baseline is the
    key slice's box extruded over the slices where the object is present."""
    from samed2_kit.engine.click_rule import dice_auc
    from samed2_kit.engine.rows import CaseRow
    from samed2_kit.metrics import case_metrics
    from samed2_kit.prompts import box_from_mask

    images, gt = item.load_volume()
    if images.ndim != 3:
        raise ValueError(f"{item.sample_id}: volume evaluation takes grey volumes (Z, H, W), "
                         f"got {images.shape}")  # fmt: skip
    load = getattr(item, "load_valid", None)
    valid = load() if load is not None else None
    if valid is not None:
        if valid.shape != gt.shape:
            raise ValueError(f"{item.sample_id}: its field of view is {valid.shape}, its masks "
                             f"{gt.shape}: the store's fov must have its image's size; rebuild "
                             "it")  # fmt: skip
        gt = gt & valid
    if not gt.any():
        return None
    z = key_slice(gt)
    box = box_from_mask(gt[z])
    kw = {} if valid is None else {"valid": valid}
    pred, curve = VOLUME_PROTOCOLS[cfg.prompt](model, images, gt, box, z, cfg, item.spacing, **kw)
    pred = pred if valid is None else pred & valid
    tol = cfg.nsd_tolerance(item.modality)
    m = case_metrics(pred, gt, item.spacing, tol, valid=valid)
    b = case_metrics(extruded_box(gt, box), gt, item.spacing, tol, valid=valid)
    row = CaseRow(item.sample_id, item.case_id, item.task, item.label, item.modality,
                  m.dice, m.nsd, m.hd95, b.dice, b.nsd, b.hd95, click_dice=curve,
                  dice_auc=dice_auc(curve) if curve else float("nan"),
                  unit="mm" if item.spacing_known else "px")  # fmt: skip
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
