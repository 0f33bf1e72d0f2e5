"""The picture the page shows: a slice in grey (or colour), the mask in blue, clicks and a box.

Small images are enlarged by a whole factor (nearest neighbour) so that the longer side is at
least `MIN_SIDE` px on screen and the markers stay visible; `to_image` maps a click on that
picture back to image pixels. Pure numpy (no matplotlib, no PIL drawing).
"""

from __future__ import annotations

import math

import numpy as np

MIN_SIDE = 512  # px on screen for the longer side of small images
MASK_RGB = np.array([30, 144, 255], np.float32)  # the mask's colour
ALPHA = 0.45
POSITIVE, NEGATIVE, BOX = (0, 220, 0), (235, 30, 30), (255, 165, 0)


def scale_of(h: int, w: int) -> int:
    """The whole enlargement factor for an (h, w) image (1 for images of MIN_SIDE px or more)."""
    return max(1, math.ceil(MIN_SIDE / max(h, w, 1)))


def to_image(xd: float, yd: float, f: int) -> tuple[float, float]:
    """Display pixel (xd, yd) of a picture enlarged f times -> image pixel (x, y) (pixel
    centres: display pixel centre k*f + (f-1)/2 is image pixel k)."""
    return (xd + 0.5) / f - 0.5, (yd + 0.5) / f - 0.5


def _disk(img: np.ndarray, x: float, y: float, r: int, rgb) -> None:
    h, w = img.shape[:2]
    y0, y1, x0, x1 = max(0, int(y - r - 1)), min(h, int(y + r + 2)), max(0, int(x - r - 1)), \
        min(w, int(x + r + 2))  # fmt: skip
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = (yy - y) ** 2 + (xx - x) ** 2
    img[y0:y1, x0:x1][d2 <= (r + 1.5) ** 2] = (255, 255, 255)  # a white rim
    img[y0:y1, x0:x1][d2 <= r**2] = rgb


def _rect(img: np.ndarray, x0, y0, x1, y1, rgb, t: int = 2) -> None:
    h, w = img.shape[:2]
    x0, x1 = sorted((int(round(x0)), int(round(x1))))
    y0, y1 = sorted((int(round(y0)), int(round(y1))))
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
    img[y0 : y0 + t, x0 : x1 + 1] = rgb
    img[max(y1 - t + 1, 0) : y1 + 1, x0 : x1 + 1] = rgb
    img[y0 : y1 + 1, x0 : x0 + t] = rgb
    img[y0 : y1 + 1, max(x1 - t + 1, 0) : x1 + 1] = rgb


def overlay(image01: np.ndarray, mask=None, points=(), labels=(), box=None, corner=None
            ) -> np.ndarray:  # fmt: skip
    """The picture: image01 (H, W) or (H, W, 3) in [0, 1], mask (H, W) bool or None, points
    [(x, y)] in image pixels with labels 1/0, box (x0, y0, x1, y1), corner (x, y) of a box being
    drawn -> (f*H, f*W, 3) uint8 with f = `scale_of(H, W)`."""
    x = np.asarray(image01, np.float32)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    rgb = np.clip(x * 255.0, 0, 255)
    if mask is not None and np.any(mask):
        m = np.asarray(mask, bool)
        rgb[m] = rgb[m] * (1 - ALPHA) + MASK_RGB * ALPHA
    f = scale_of(*rgb.shape[:2])
    img = rgb.astype(np.uint8)
    if f > 1:
        img = np.repeat(np.repeat(img, f, axis=0), f, axis=1)
    r = max(3, round(min(img.shape[:2]) / 110))

    def d(v):  # image pixel -> display pixel centre
        return v * f + (f - 1) / 2

    if box is not None:
        _rect(img, d(box[0]), d(box[1]), d(box[2]), d(box[3]), BOX, max(2, r // 3))
    if corner is not None:
        _disk(img, d(corner[0]), d(corner[1]), max(2, r // 2), BOX)
    for (px, py), lab in zip(points, labels, strict=True):
        _disk(img, d(px), d(py), r, POSITIVE if int(lab) == 1 else NEGATIVE)
    return img
