"""Per-case segmentation metrics (Dice, NSD, HD95), spacing-aware, computed with MONAI.

Spacing-aware surface metrics are easy to get subtly wrong by hand, so the heavy lifting is
delegated to ``monai.metrics``; this module only converts masks to MONAI's one-hot layout and
applies explicit conventions for empty masks (which MONAI would otherwise warn about and turn
into nan/inf).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["CaseMetrics", "case_metrics", "summarize"]


@dataclass
class CaseMetrics:
    """Metrics of one case (one 2D slice/frame or one 3D volume).

    Attributes:
        dice: Dice coefficient in [0, 1].
        nsd: normalised surface Dice in [0, 1] at the tolerance given to :func:`case_metrics`.
        hd95: 95th-percentile symmetric Hausdorff distance in mm; ``nan`` when undefined
            (exactly one of the masks is empty).
    """

    dice: float
    nsd: float
    hd95: float


def _as_bool_tensor(mask: Any, name: str) -> torch.Tensor:
    """Binary mask (any dtype, nonzero = foreground) -> CPU bool tensor of the same shape."""
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu() != 0
    try:
        arr = np.asarray(mask)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(mask)}") from exc
    return torch.from_numpy(np.ascontiguousarray(arr != 0))


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(
            f"spacing has {len(values)} values {values} but the masks have {ndim} spatial axes; "
            f"pass one size in mm per axis, in the array's axis order (or spacing=None for 1 mm)."
        )
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be finite and > 0 (mm), got {values}.")
    return values


def _one_hot(mask: torch.Tensor) -> torch.Tensor:
    """(spatial...) bool -> (1, 2, spatial...) float one-hot: channel 0 background, 1 foreground."""
    return torch.stack([~mask, mask]).unsqueeze(0).float()


def case_metrics(
    pred: Any,
    gt: Any,
    spacing: Sequence[float] | None = None,
    nsd_tolerance_mm: float = 2.0,
    valid: Any = None,
) -> CaseMetrics:
    """Dice, normalised surface Dice and HD95 of one binary prediction against its ground truth.

    Args:
        pred: predicted binary mask, numpy array or torch tensor of shape (H, W) or (D, H, W),
            any dtype; nonzero = foreground.
        gt: ground-truth binary mask, same shape as ``pred``.
        spacing: pixel/voxel size in mm per axis, same axis order as the arrays (2 or 3 values);
            ``None`` means 1.0 mm per axis.
        nsd_tolerance_mm: NSD tolerance in mm; a boundary element counts as correct when its
            distance to the other boundary is <= this value.
        valid: the field of view, same shape as ``pred`` (nonzero = inside), or None. Both
            ``pred`` and ``gt`` are zeroed outside it before any metric (so errors there do not
            count, and the empty-mask conventions apply to what is left inside).

    Returns:
        :class:`CaseMetrics` with ``hd95`` in mm.

    Empty-mask conventions (handled before MONAI, so MONAI emits no empty-mask warnings):
        * both empty: dice = 1, nsd = 1, hd95 = 0 (a correct "nothing here" prediction);
        * exactly one empty: dice = 0, nsd = 0, hd95 = nan (distance undefined; use
          :func:`summarize`, which ignores nan and counts such cases).

    Boundaries are MONAI's edge voxels (mask XOR its binary erosion); distances are Euclidean
    in mm (coordinates scaled by ``spacing``).
    """
    p = _as_bool_tensor(pred, "pred")
    g = _as_bool_tensor(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got pred {tuple(p.shape)} and gt "
            f"{tuple(g.shape)}; resample the prediction to the ground-truth grid first."
        )
    if p.ndim not in (2, 3):
        raise ValueError(
            f"pred/gt must be 2D (H, W) or 3D (D, H, W) masks, got shape {tuple(p.shape)}; "
            "squeeze batch/channel axes before calling case_metrics."
        )
    if valid is not None:
        v = _as_bool_tensor(valid, "valid")
        if v.shape != p.shape:
            raise ValueError(
                f"valid (the field of view) must have the masks' shape {tuple(p.shape)}, got "
                f"{tuple(v.shape)}; pass the FOV of the ground truth's image, at its resolution."
            )
        p, g = p & v, g & v
    sp = _check_spacing(spacing, p.ndim)
    tol = float(nsd_tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"nsd_tolerance_mm must be finite and >= 0 (mm), got {nsd_tolerance_mm}.")

    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return CaseMetrics(dice=1.0, nsd=1.0, hd95=0.0)
    if p_any != g_any:
        return CaseMetrics(dice=0.0, nsd=0.0, hd95=float("nan"))

    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    # MONAI wants one-hot (B, C, spatial...); channel 0 is background and is dropped with
    # include_background=False, so every result below is (1, 1) for the foreground class.
    yp, yt = _one_hot(p), _one_hot(g)
    with warnings.catch_warnings():
        # MONAI 1.5/1.6 passes its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        dice = compute_dice(yp, yt, include_background=False)
        nsd = compute_surface_dice(
            yp, yt, class_thresholds=[tol], include_background=False, spacing=list(sp)
        )
        hd95 = compute_hausdorff_distance(
            yp, yt, include_background=False, percentile=95, spacing=list(sp)
        )
    return CaseMetrics(dice=float(dice[0, 0]), nsd=float(nsd[0, 0]), hd95=float(hd95[0, 0]))


def summarize(values: Sequence[CaseMetrics]) -> dict[str, float]:
    """Aggregate per-case metrics.

    Returns:
        ``{"dice", "nsd", "hd95"}``: nan-ignoring means (``nan`` if no finite value),
        ``"n"``: number of cases, ``"hd95_undefined"``: number of cases with nan hd95.
    """
    out: dict[str, float] = {}
    for field in ("dice", "nsd", "hd95"):
        arr = np.asarray([getattr(v, field) for v in values], dtype=np.float64)
        finite = arr[~np.isnan(arr)]
        out[field] = float(finite.mean()) if finite.size else float("nan")
    out["n"] = len(values)
    out["hd95_undefined"] = sum(1 for v in values if math.isnan(v.hd95))
    return out
