"""Evaluation with a fixed prompt protocol: per-case Dice, NSD and HD95 (MONAI, spacing-aware),
next to the box-filled baseline (the prompt box itself as the mask).

Prompts come from the ground truth, deterministically, in original-image pixels:
- box: the tight box of the mask;
- point: one positive click at the mask pixel farthest from its border.
Evaluation runs under `torch.no_grad()` in eval mode and restores the model's mode afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

PROTOCOLS = ("box", "point")


@dataclass
class CaseRow:
    sample_id: str
    case_id: str
    task: str
    label: str
    dice: float
    nsd: float
    hd95: float
    box_dice: float
    box_nsd: float
    box_hd95: float


def gt_prompt(mask: np.ndarray, protocol: str) -> dict:
    """Deterministic prompt from a ground-truth mask (H, W) bool, in pixel coordinates."""
    from scipy import ndimage

    from samed2_kit.prompts import box_from_mask

    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.prompt={protocol!r}: choose one of {PROTOCOLS}")
    if protocol == "box":
        return {"box": box_from_mask(mask)}
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return {"point_coords": np.array([[x, y]], np.float32), "point_labels": np.array([1])}


def box_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The box-filled baseline: every pixel whose centre lies in the box (x0, y0, x1, y1)."""
    h, w = shape
    x0, y0, x1, y1 = box
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    return (xs >= np.floor(x0)) & (xs <= np.ceil(x1)) & (ys >= np.floor(y0)) & (ys <= np.ceil(y1))


def evaluate(model, items, protocol: str = "box", nsd_tolerance_mm: float = 2.0, progress=True):
    """Evaluate `model` on `EvalItem`s (see `samed2_kit.engine.items`); returns (rows, predictions),
    predictions[i] being the predicted mask (H, W) bool of rows[i] (kept for overlays). Samples
    with an empty ground truth are skipped (no prompt can be made from them). The box baseline
    always uses the tight box."""
    from tqdm.auto import tqdm

    from samed2_kit.metrics import case_metrics
    from samed2_kit.model.predictor import Predictor
    from samed2_kit.prompts import box_from_mask

    was_training = model.training
    predictor = Predictor(model)
    rows, preds = [], []
    try:
        with torch.no_grad():
            for it in tqdm(items, desc=f"eval ({protocol})", disable=not progress):
                image, gt = it.load()
                if not gt.any():
                    continue
                predictor.set_image(image, modality=it.intensity, window=it.window)
                masks, _, _ = predictor.predict(**gt_prompt(gt, protocol), multimask_output=False)
                pred = masks[0]
                m = case_metrics(pred, gt, it.spacing, nsd_tolerance_mm)
                box = box_mask(gt.shape, box_from_mask(gt))
                b = case_metrics(box, gt, it.spacing, nsd_tolerance_mm)
                rows.append(
                    CaseRow(it.sample_id, it.case_id, it.task, it.label,
                            m.dice, m.nsd, m.hd95, b.dice, b.nsd, b.hd95)
                )  # fmt: skip
                preds.append(pred)
    finally:
        model.train(was_training)
    return rows, preds


def summarize(rows: list[CaseRow]) -> dict:
    """Mean metrics overall and per task (nan-aware), for the model and the box baseline."""

    def agg(rs: list[CaseRow]) -> dict:
        out = {"n": len(rs)}
        for key in ("dice", "nsd", "hd95", "box_dice", "box_nsd", "box_hd95"):
            vals = np.array([getattr(r, key) for r in rs], dtype=float)
            out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        return out

    tasks = sorted({r.task for r in rows})
    return {
        "overall": agg(rows),
        "per_task": {t: agg([r for r in rows if r.task == t]) for t in tasks},
    }


def write_csv(rows: list[CaseRow], path) -> None:
    import csv
    import io

    from samed2_kit.utils.atomic import write_text

    buf = io.StringIO()
    fields = list(CaseRow.__dataclass_fields__)
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    write_text(path, buf.getvalue())
