"""Evaluation with a fixed prompt protocol: per-case Dice, NSD and HD95 (MONAI, spacing-aware),
next to the box-filled baseline (the prompt box itself as the mask).

Prompts come from the ground truth, deterministically (no random numbers), in original-image pixels:

- box: the tight box of the mask;
- point: one positive click at the mask pixel farthest from its border;
- box+clicks: the box, then up to K corrective clicks (`EvalConfig.clicks`). Each click goes to
  the largest connected error region of the current prediction (false negatives and false
  positives labelled separately, 4-connected; on equal sizes false negatives first, then the
  region met first in raster order), at its pixel farthest from the region's border (the first in
  raster order on ties); positive on a false negative, negative on a false positive. The model is
  then prompted with the box, all clicks so far and the previous low-res logits as mask input
  (SAM's interactive protocol). When nothing is wrong any more, the remaining clicks keep the
  last Dice.
- support (few-shot): no prompt from the ground truth; the model predicts from the support
  examples of the item's task (`supports=`, given to a model with the hard_prototypes source).
  With supports, the other protocols combine the prompt with the supports.

  The per-click Dice curve d_0..d_K (d_0 after the box) is summarised by its area:
  DICE_AUC = trapezoid area under d against the click number 0..K, divided by K, so it lies in
  [0, 1] (the DSC_AUC of the CVPR 2025 challenge "Foundation Models for Interactive 3D Biomedical
  Image Segmentation", normalised by K here; K = 0 gives d_0). The row's Dice, NSD and HD95 are
  those of the final prediction.

Field of view: an item with one (`EvalItem.load_valid`, the store's `fov` column) has its ground
truth and every prediction (and the box baseline) zeroed outside it before prompts, clicks and
metrics, so nothing outside the FOV counts; an item whose ground truth lies wholly outside it is
skipped like an empty one.

Evaluation runs under `torch.no_grad()` in eval mode and restores every module's training flag;
parameters and buffers are left as they were. Under torch.distributed each process evaluates
items[rank::world] and all processes return every row, once, in input order.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np
import torch

from samed2_kit.config import EVAL_PROTOCOLS as PROTOCOLS
from samed2_kit.config import EvalConfig
from samed2_kit.engine.click_rule import (  # noqa: F401  (re-exported: the click rule)
    Click,
    corrective_click,
    dice,
    dice_auc,
    innermost_pixel,
    largest_error,
)
from samed2_kit.engine.rows import CaseRow, limit_per_task

METRICS = ("dice", "nsd", "hd95", "box_dice", "box_nsd", "box_hd95")


def gt_prompt(mask: np.ndarray, protocol: str) -> dict:
    """First prompt of `protocol` from a ground-truth mask (H, W) bool, in pixel coordinates:
    {"box": (4,) x0 y0 x1 y1} for box and box+clicks, one positive point for point."""
    from samed2_kit.prompts import box_from_mask

    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.prompt={protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol in ("box", "box+clicks"):
        return {"box": box_from_mask(mask)}
    if protocol == "support":
        return {}
    y, x = innermost_pixel(mask)
    return {"point_coords": np.array([[x, y]], np.float32), "point_labels": np.array([1])}


def box_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The box-filled baseline: every pixel whose centre lies in the box (x0, y0, x1, y1)."""
    h, w = shape
    x0, y0, x1, y1 = box
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    return (xs >= np.floor(x0)) & (xs <= np.ceil(x1)) & (ys >= np.floor(y0)) & (ys <= np.ceil(y1))


def click_session(predictor, gt: np.ndarray, box: np.ndarray, clicks: int, valid=None):
    """Box, then up to `clicks` corrective clicks on the predictor's current image. `valid`:
    the field of view (H, W) bool, or None; every prediction is zeroed outside it (give a `gt`
    zeroed there too), so errors and clicks lie inside it.

    Returns the final mask (H, W) bool and the Dice curve (clicks + 1 values)."""
    masks, _, low = predictor.predict(box=box, multimask_output=False)
    pred = masks[0] if valid is None else masks[0] & valid
    curve = [dice(pred, gt)]
    coords, labels = [], []
    for _ in range(clicks):
        click = corrective_click(pred, gt)
        if click is None:  # nothing left to correct: the last Dice holds for the other clicks
            curve += [curve[-1]] * (clicks + 1 - len(curve))
            break
        coords.append((click.x, click.y))
        labels.append(int(click.positive))
        masks, _, low = predictor.predict(
            point_coords=np.array(coords, np.float32),
            point_labels=np.array(labels),
            box=box,
            mask_input=low,
            multimask_output=False,
        )
        pred = masks[0] if valid is None else masks[0] & valid
        curve.append(dice(pred, gt))
    return pred, curve


def item_fov(item, shape: tuple[int, int]) -> np.ndarray | None:
    """An item's field of view (H, W) bool (`load_valid`), or None when it has none; ValueError
    when it is not of the ground truth's `shape`."""
    load = getattr(item, "load_valid", None)
    valid = load() if load is not None else None
    if valid is not None and valid.shape != tuple(shape):
        raise ValueError(
            f"{item.sample_id}: its field of view is {valid.shape[0]}x{valid.shape[1]}, its mask "
            f"{shape[0]}x{shape[1]}: the store's fov must have its image's size; rebuild it"
        )
    return valid


def evaluate_item(predictor, item, cfg: EvalConfig) -> tuple[CaseRow, np.ndarray] | None:
    """One `EvalItem` under `cfg`'s protocol: its row and predicted mask (H, W) bool; None when
    its ground truth is empty (no prompt can be made from it). With a field of view
    (`item.load_valid`), ground truth, predictions and baseline are zeroed outside it first."""
    from samed2_kit.metrics import case_metrics

    image, gt = item.load()
    valid = item_fov(item, gt.shape)
    if valid is not None:
        gt = gt & valid
    if not gt.any():
        return None
    t = getattr(predictor, "clip_len", 1)  # temporal models see the clip they trained on
    clip = {"neighbors": item.load_clip(t)} if t > 1 and getattr(item, "load_clip", None) else {}
    predictor.set_image(image, modality=item.intensity, window=item.window, **clip)
    box = gt_prompt(gt, "box")["box"]
    curve: list[float] = []
    if cfg.prompt == "box+clicks":
        pred, curve = click_session(predictor, gt, box, cfg.clicks, valid)
    else:
        masks, _, _ = predictor.predict(**gt_prompt(gt, cfg.prompt), multimask_output=False)
        pred = masks[0] if valid is None else masks[0] & valid
    tol = cfg.nsd_tolerance(item.modality)
    m = case_metrics(pred, gt, item.spacing, tol, valid=valid)
    b = case_metrics(box_mask(gt.shape, box), gt, item.spacing, tol, valid=valid)
    row = CaseRow(
        item.sample_id, item.case_id, item.task, item.label, item.modality,
        m.dice, m.nsd, m.hd95, b.dice, b.nsd, b.hd95,
        click_dice=curve, dice_auc=dice_auc(curve) if curve else float("nan"),
        unit="mm" if getattr(item, "spacing_known", True) else "px",
    )  # fmt: skip
    return row, pred


def _rank_world() -> tuple[int, int]:
    """(process index, number of processes): Accelerate's PartialState when torch.distributed is
    initialised, else (0, 1)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    from accelerate import PartialState

    if PartialState._shared_state:  # made by the caller (run_recipe, cmd_eval)
        state = PartialState()
        return state.process_index, state.num_processes
    return dist.get_rank(), dist.get_world_size()


def _pack(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    return np.packbits(mask.ravel()), mask.shape


def _unpack(packed: tuple[np.ndarray, tuple[int, int]]) -> np.ndarray:
    bits, shape = packed
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def _gather(local: list, world: int) -> list:
    """Every process's `local` list, concatenated (the list itself in one process)."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


class _Supports:
    """Sets the predictor's supports to those of each item's task, whenever the task changes."""

    def __init__(self, predictor, supports: dict | None, protocol: str) -> None:
        self.predictor, self.supports, self.protocol = predictor, supports or {}, protocol
        self.task: str | None = None

    def use(self, item) -> None:
        if item.task == self.task:
            return
        chosen = self.supports.get(item.task)
        if not chosen:
            if self.protocol == "support":
                raise ValueError(
                    f"eval.prompt=support: no support examples for task {item.task!r} (have: "
                    f"{sorted(self.supports)}); pass supports for every task evaluated"
                )
            self.predictor.clear_support()
        else:
            loaded = [s.load() for s in chosen]
            self.predictor.set_support([i for i, _ in loaded], [m for _, m in loaded],
                                       modality=chosen[0].intensity, window=chosen[0].window)  # fmt: skip
        self.task = item.task


def evaluate(
    model, items: list, cfg: EvalConfig, progress: bool = True, supports: dict | None = None
) -> tuple[list[CaseRow], list[np.ndarray]]:
    """Evaluate `model` on `EvalItem`s (`samed2_kit.engine.items`) under `cfg`'s protocol.

    Returns (rows, predictions): predictions[i] is the predicted mask (H, W) bool of rows[i], in
    the input order of the items (at most `cfg.max_items` per task; items with an empty ground
    truth are skipped). Under torch.distributed each process evaluates items[rank::world] and every
    process returns all rows. The box baseline always uses the tight box.

    supports: {task: [EvalItem, ...]} support examples per task (few-shot models); required for
    `cfg.prompt == "support"`, combined with the prompt otherwise.
    """
    from tqdm.auto import tqdm

    from samed2_kit.engine.volumes import VOLUME_PROTOCOLS, evaluate_volumes
    from samed2_kit.model.predictor import Predictor
    from samed2_kit.utils.modes import restored_modes

    if cfg.prompt in VOLUME_PROTOCOLS:
        if not all(hasattr(it, "load_volume") for it in items):
            raise ValueError(f"eval.prompt={cfg.prompt} evaluates volumes: give VolumeItems "
                             "(`eval_items` / `engine.volumes.volumes_from_store`)")  # fmt: skip
        return evaluate_volumes(model, items, cfg, progress)

    if cfg.prompt == "support" and not model.support_sources():
        raise ValueError(
            "eval.prompt=support is few-shot evaluation: it needs a model with a prompt source "
            "that reads supports (e.g. hard_prototypes, trained by recipes/few_shot.yaml); "
            "choose another protocol for this model"
        )
    items = limit_per_task(items, cfg.max_items)
    rank, world = _rank_world()
    local = []
    with restored_modes(model), torch.no_grad():  # the Predictor puts the model in eval mode
        predictor = Predictor(model)
        tasks = _Supports(predictor, supports, cfg.prompt)
        mine = range(rank, len(items), world)
        desc = f"eval ({cfg.prompt})"
        for i in tqdm(mine, desc=desc, disable=not progress or rank != 0):
            tasks.use(items[i])
            out = evaluate_item(predictor, items[i], cfg)
            if out is not None:
                local.append((i, out[0], _pack(out[1])))
    merged = sorted(_gather(local, world), key=lambda r: r[0])
    return [r for _, r, _ in merged], [_unpack(p) for _, _, p in merged]


def _mean(values) -> float:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def gain_interval(rows: list[CaseRow], resamples: int = 2000, seed: int = 0) -> list[float]:
    """Paired bootstrap 95% interval of the mean Dice gain over the baseline (dice - box_dice),
    with cases (not slices or objects) as the unit: each case's rows are averaged first, then
    cases are resampled with replacement (seeded). [nan, nan] with fewer than 2 cases."""
    by_case: dict[str, list[float]] = {}
    for r in rows:
        if np.isfinite(r.dice) and np.isfinite(r.box_dice):
            by_case.setdefault(r.case_id, []).append(r.dice - r.box_dice)
    gains = np.array([np.mean(v) for v in by_case.values()])
    if len(gains) < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = gains[rng.integers(0, len(gains), (resamples, len(gains)))].mean(axis=1)
    return [float(v) for v in np.percentile(means, [2.5, 97.5])]


def aggregate(rows: list[CaseRow]) -> dict:
    """Nan-ignoring means of one group: n, dice, nsd, hd95 (in `unit`: "mm", or "px" for data
    without a pixel size, "mm+px" for a mix), box_*, `cases` and
    `gain_ci95` (`gain_interval` of dice - box_dice); for box+clicks also the mean per-click
    curve `click_dice` (K + 1 values) and the mean `dice_auc`."""
    units = sorted({r.unit for r in rows})
    out: dict = {"n": len(rows), "cases": len({r.case_id for r in rows}),
                 "unit": units[0] if len(units) == 1 else "+".join(units)}  # fmt: skip
    for key in METRICS:
        out[key] = _mean(getattr(r, key) for r in rows)
    out["gain_ci95"] = gain_interval(rows)
    curves = [r.click_dice for r in rows if r.click_dice]
    if curves:
        k = max(len(c) for c in curves)
        padded = np.array([c + [c[-1]] * (k - len(c)) for c in curves], dtype=float)
        out["click_dice"] = [float(v) for v in padded.mean(axis=0)]
        out["dice_auc"] = _mean(r.dice_auc for r in rows)
    return out


def summarize(rows: list[CaseRow]) -> dict:
    """{"overall": group, "per_task": {task: group}, "per_modality": {modality: group}}, each
    group as `aggregate` makes it, for the model and the box baseline."""

    def by(key: str) -> dict:
        names = sorted({getattr(r, key) for r in rows})
        return {n: aggregate([r for r in rows if getattr(r, key) == n]) for n in names}

    return {"overall": aggregate(rows), "per_task": by("task"), "per_modality": by("modality")}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, list):
        return ";".join(f"{v:.8g}" for v in value)
    return str(value)


def write_csv(rows: list[CaseRow], path) -> None:
    """One line per row, atomically; floats to 8 significant digits, click_dice as "d0;d1;..."."""
    import csv
    import io

    from samed2_kit.utils.atomic import write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[f.name for f in fields(CaseRow)])
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in asdict(r).items()})
    write_text(path, buf.getvalue())


def read_csv(path) -> list[CaseRow]:
    """Rows written by `write_csv`."""
    import csv

    floats = set(METRICS) | {"dice_auc"}
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            kw: dict = {k: float(v) if k in floats else v for k, v in rec.items()}
            cd = rec["click_dice"]
            kw["click_dice"] = [float(v) for v in cd.split(";")] if cd else []
            out.append(CaseRow(**kw))
    return out


def eval_items(store: str, cfg: EvalConfig, tasks: list[str] | None = None) -> list:
    """What `cfg.prompt` evaluates in `cfg.split` of `store`: its volumes (one per case and
    label) for a volume protocol (`engine.volumes`), else its 2D samples (`engine.items`)."""
    from samed2_kit.engine.items import items_from_store
    from samed2_kit.engine.volumes import VOLUME_PROTOCOLS, volumes_from_store

    if cfg.prompt in VOLUME_PROTOCOLS:
        return volumes_from_store(store, cfg.split, tasks)
    return items_from_store(store, cfg.split, tasks, cfg.max_items)
