"""Readers for 2D image and mask files (PNG, JPEG, TIFF, BMP, and what Pillow opens).

Files are decoded by their content, not their extension: a ``.png`` that holds JPEG data (BUSI)
reads fine. Arrays come back in RGB channel order (never OpenCV's BGR) with the stored dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUPPORTED = "PNG, JPEG, TIFF, BMP (via OpenCV), and GIF/WebP/other formats Pillow can open"


def _decode_cv2(data: np.ndarray) -> np.ndarray | None:
    import cv2

    try:
        arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        return None
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    return arr


def _decode_pillow(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.seek(0)
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert(
                    "RGBA" if "A" in img.mode or "transparency" in img.info else "RGB"
                )
            if img.mode == "LA":
                img = img.convert("L")
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image file.

    Args:
        path: image file; decoded by content (``.png`` holding JPEG works).

    Returns:
        ``(H, W)`` grey or ``(H, W, 3)`` RGB array with the stored dtype (uint8, uint16, float32,
        ...). RGBA drops its alpha channel (no compositing). Grey images saved as RGB with equal
        channels stay ``(H, W, 3)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an image that OpenCV or Pillow can decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist (check the path and pattern)")
    # np.fromfile + imdecode instead of imread: also works with non-ASCII paths on Windows.
    arr = _decode_cv2(np.fromfile(path, dtype=np.uint8))
    if arr is None:
        arr = _decode_pillow(path)
    if arr is None or arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(
            f"cannot read image file {path}: not a decodable image. Supported formats: {SUPPORTED}. "
            "Check that the file is not truncated, empty or a different kind of file."
        )
    if arr.ndim == 3 and arr.shape[2] not in (1, 3):
        raise ValueError(
            f"image file {path} has {arr.shape[2]} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)"
        )
    return arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr


def read_mask(path: str | Path, threshold: float = 127) -> np.ndarray:
    """Read a binary mask file as ``(H, W)`` bool (True = foreground).

    Rule: colour masks are reduced to their channel maximum (alpha ignored). If the mask's
    maximum is <= 1 (0/1 label PNGs, float masks in [0, 1]) every value > 0 is foreground;
    otherwise values > ``threshold`` are (0/255 masks; binarises JPEG edge noise such as 30 or
    200). An integer mask whose maximum lies in 2..threshold (a multi-label map such as
    {0, 1, 7, 8} or a mis-scaled mask) raises ``ValueError`` instead of silently reading as
    empty: split the label map into one binary mask per label, or pass ``threshold=0``.

    Args:
        path: mask file, any format :func:`read_image` reads.
        threshold: foreground is ``value > threshold`` for masks with maximum > 1.
    """
    arr = read_image(path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"mask file {path} holds NaN or infinite values; fix the file")
    peak = arr.max()
    if peak <= 1:
        return arr > 0
    if arr.dtype.kind in "iub" and peak <= threshold:
        values = np.unique(arr)[:8].tolist()
        raise ValueError(
            f"mask file {path} has maximum value {peak} <= threshold {threshold} (values {values}"
            "...): it looks like a multi-label map, and would read as empty. Split it into one "
            "binary mask per label, or call read_mask(path, threshold=0) to take every non-zero "
            "value as foreground."
        )
    return arr > threshold
