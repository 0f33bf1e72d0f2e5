"""The corrective-click rule of the interactive protocols, in 2D and 3D, and the Dice curve.

The next click goes to the largest connected error region of the prediction (false negatives and
false positives labelled separately, face-connected; on equal sizes false negatives first, then
the region met first in raster order), at its pixel (voxel) farthest from the region's border
(the first in raster order on ties); positive on a false negative, negative on a false positive.
`engine.evaluate` (box+clicks) and `engine.volumes` (slice-box+clicks) use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Click:
    """A click at pixel (x, y) = (column, row) of the original image; positive = foreground."""

    x: int
    y: int
    positive: bool


def innermost_pixel(mask: np.ndarray, sampling=None) -> tuple[int, ...]:
    """Index ((y, x) of a 2D mask, (z, y, x) of a 3D one) of the pixel of `mask` farthest from
    its border (outside the array counts as border), distances in `sampling` units per axis
    (None: pixels); the first in raster order on ties."""
    from scipy import ndimage

    inner = (slice(1, -1),) * mask.ndim
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sampling)[inner]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape))


def largest_error(pred: np.ndarray, gt: np.ndarray, sampling=None):
    """(index, positive) of the next corrective click in n-D (2D images, 3D volumes): the
    innermost pixel (`innermost_pixel`) of the largest connected error region (face-connected;
    false negatives first on equal sizes, then the first in raster order); positive on a false
    negative. None when `pred` and `gt` agree."""
    from scipy import ndimage

    best = None  # (size, positive, component mask within its bounding box, offset)
    for positive, error in ((True, gt & ~pred), (False, pred & ~gt)):
        labels, n = ndimage.label(error)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        k = int(np.argmax(sizes))  # labels follow raster order: the first largest
        if best is None or sizes[k] > best[0]:
            box = ndimage.find_objects(labels, max_label=k + 1)[k]
            best = (sizes[k], positive, labels[box] == k + 1, tuple(b.start for b in box))
    if best is None:
        return None
    _, positive, component, offset = best
    inner = innermost_pixel(component, sampling)
    return tuple(o + i for o, i in zip(offset, inner, strict=True)), positive


def corrective_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The next corrective click for prediction `pred` against `gt` (both (H, W) bool), or None
    when they agree. See the module docstring for the rule."""
    found = largest_error(pred, gt)
    if found is None:
        return None
    (y, x), positive = found
    return Click(x, y, positive)


def dice_auc(curve: list[float]) -> float:
    """Trapezoid area under Dice d_0..d_K against click number 0..K, divided by K (in [0, 1]);
    d_0 when K = 0; nan for an empty curve."""
    d = np.asarray(curve, dtype=float)
    if d.size == 0:
        return float("nan")
    if d.size == 1:
        return float(d[0])
    return float((d.sum() - (d[0] + d[-1]) / 2) / (d.size - 1))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two (H, W) bool masks; 1 when both are empty."""
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & gt).sum()) / total
