"""What `Predictor.set_image` takes as an image (no torch here): the shapes, the smallest side,
the pixel types, finite values, and a temporal clip around it; errors name the fix."""

from __future__ import annotations

import logging

import numpy as np

# the smallest image side (px) set_image takes: smaller is a crop or a thumbnail, not an image
MIN_IMAGE_SIDE = 8

logger = logging.getLogger(__name__)


def check_image(image, where: str = "set_image", note_alpha: bool = True) -> np.ndarray:
    """`image` as an (H, W) or (H, W, 3) array the intensity handling takes, or a ValueError
    that starts with `where` and names the fix.

    Takes (H, W), (H, W, 1) (-> (H, W)), (H, W, 3) and (H, W, 4) RGBA (-> RGB: the alpha channel
    is dropped, logged as a warning when `note_alpha`); each side >= `MIN_IMAGE_SIDE` px;
    integer, bool or float pixels, every float pixel finite (no NaN / infinity).
    """
    try:
        image = np.asarray(image)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: the image is not an array of pixels ({e})") from e
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        hint = "for a volume, pass one slice (volume[z])"
        if image.ndim == 3 and image.shape[0] in (1, 3, 4):
            hint = "channels first? use image.transpose(1, 2, 0); " + hint
        raise ValueError(
            f"{where}: expected (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA array, got shape "
            f"{image.shape}; {hint}"
        )
    if image.ndim == 3 and image.shape[2] == 4:
        if note_alpha:
            logger.warning("%s: RGBA image: the alpha channel is dropped (the model reads RGB)",
                           where)  # fmt: skip
        image = image[:, :, :3]
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"{where}: the image is {w}x{h} (WxH) pixels; each side must be at least "
            f"{MIN_IMAGE_SIDE} px: give the whole image, not a crop or a thumbnail"
        )
    if image.dtype.kind not in "biuf":
        raise ValueError(
            f"{where}: the image has dtype {image.dtype}: give integer or float pixel values"
        )
    if image.dtype.kind == "f":
        bad = ~np.isfinite(image)
        if bad.any():
            r, c = np.argwhere(bad)[0][:2]
            raise ValueError(
                f"{where}: the image holds {int(bad.sum())} NaN or infinite pixel values (the "
                f"first at row {r}, column {c}): replace them first, e.g. "
                "np.nan_to_num(image, nan=background, posinf=..., neginf=...) (-1000 for CT in HU)"
            )
    return image


def check_clip(neighbors, image: np.ndarray, t: int) -> list[np.ndarray]:
    """The T slices of `neighbors` as a list, after checking they fit `image` (the centre)."""
    clip = np.asarray(neighbors)
    if clip.ndim != image.ndim + 1 or len(clip) != t or clip.shape[1:3] != image.shape[:2]:
        raise ValueError(
            f"set_image: neighbors has shape {clip.shape}; this model's temporal adapters take "
            f"clips of T={t} slices: give ({t}, {image.shape[0]}, {image.shape[1]}"
            f"{', 3' if image.ndim == 3 else ''}) with the image at position {t // 2}, or None"
        )
    return list(clip)
