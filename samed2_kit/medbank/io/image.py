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


COLOUR_TOLERANCE = 32  # 8-bit units per channel: JPEG noise, not a different colour


def _to_8bit_scale(arr: np.ndarray) -> np.ndarray:
    """Integer or float mask values as float on the 8-bit scale: 16-bit values whose maximum
    exceeds 255 are divided by 257, floats in [0, 1] multiplied by 255, others kept."""
    out = arr.astype(np.float64)
    if arr.dtype.kind == "f" and arr.size and out.max() <= 1:
        return out * 255
    if arr.dtype.kind in "iu" and arr.itemsize >= 2 and arr.size and out.max() > 255:
        return out / 257
    return out


def _colours(arr: np.ndarray, n: int = 5) -> list[list[int]]:
    """The `n` most common (r, g, b) colours of an (H, W, 3) array, most common first."""
    values, counts = np.unique(arr.reshape(-1, 3), axis=0, return_counts=True)
    return [values[k].tolist() for k in np.argsort(-counts, kind="stable")[:n]]


def _check_finite(arr: np.ndarray, path) -> None:
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"mask file {path} holds NaN or infinite values; fix the file")


def read_mask(
    path: str | Path, threshold: float = 127, channel: int | None = None, on_colour: str = "max"
) -> np.ndarray:
    """Read a binary mask file as ``(H, W)`` bool (True = foreground).

    Rule: if the mask's maximum is <= 1 (0/1 label PNGs, float masks in [0, 1]) every value > 0
    is foreground; otherwise values > ``threshold`` are (0/255 masks; binarises JPEG edge noise
    such as 30 or 200). ``threshold`` is on the 8-bit scale: a 16-bit mask whose maximum exceeds
    255 compares with ``threshold * 257`` (127 -> 32639, so 0/65535 masks read as expected); one
    whose maximum is <= 255 (8-bit values saved as 16-bit) compares with ``threshold``. An integer
    mask whose maximum lies in 2..threshold (a multi-label map such as {0, 1, 7, 8} or a
    mis-scaled mask) raises ``ValueError`` instead of silently reading as empty: split the label
    map into one binary mask per label, or pass ``threshold=0``.

    Colour masks (alpha ignored): with ``channel`` (0 R, 1 G, 2 B) that channel is the mask (a
    grey mask is read as is). Otherwise channels that are equal up to JPEG noise (at most
    ``COLOUR_TOLERANCE`` = 32 apart at every pixel, 8-bit scale) are one grey mask; channels that
    differ are reduced to their maximum with ``on_colour="max"`` (the default), or raise
    ``ValueError`` with ``on_colour="error"`` (medbank: a colour-coded label map would silently
    become one object; spec keys ``mask_channel`` and ``mask_colors``).

    Args:
        path: mask file, any format :func:`read_image` reads.
        threshold: foreground is ``value > threshold`` (8-bit scale) for masks with maximum > 1.
        channel: read this channel of an RGB mask.
        on_colour: "max" or "error", for RGB masks whose channels differ (``channel`` unset).
    """
    if on_colour not in ("max", "error"):
        raise ValueError(f"read_mask: on_colour={on_colour!r}; use 'max' or 'error'")
    arr = read_image(path)
    _check_finite(arr, path)
    if arr.ndim == 3 and channel is not None:
        if channel not in (0, 1, 2):
            raise ValueError(f"read_mask: channel={channel}; use 0 (R), 1 (G) or 2 (B)")
        arr = arr[:, :, channel]
    elif arr.ndim == 3:
        scaled = _to_8bit_scale(arr)
        spread = scaled.max(axis=2) - scaled.min(axis=2)
        if on_colour == "error" and spread.max() > COLOUR_TOLERANCE:
            y, x = np.unravel_index(int(spread.argmax()), spread.shape)
            raise ValueError(
                f"mask file {path} is a colour mask: its R, G, B channels differ (pixel (row "
                f"{y}, col {x}) is {arr[y, x].tolist()}; most common colours "
                f"{_colours(arr)}), so it looks like a colour-coded label map that would read "
                "as one object. In the spec's source set mask_channel: 0|1|2 to read one "
                "channel, or mask_colors: {label: [r, g, b], ...} to read each colour as one "
                "label."
            )
        arr = arr.max(axis=2)
    peak = arr.max()
    if peak <= 1:
        return arr > 0
    cut = (
        threshold * 257
        if arr.dtype.kind in "iu" and arr.itemsize >= 2 and peak > 255
        else threshold
    )
    if arr.dtype.kind in "iub" and peak <= cut:
        values = np.unique(arr)[:8].tolist()
        raise ValueError(
            f"mask file {path} has maximum value {peak} <= threshold {cut} (values {values}"
            "...): it looks like a multi-label map, and would read as empty. Split it into one "
            "binary mask per label, or lower the threshold (spec key mask_threshold, 8-bit "
            "scale; read_mask(path, threshold=0) takes every non-zero value as foreground)."
        )
    return arr > cut


def read_colour_masks(path: str | Path, colours: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Split a colour-coded label map into one ``(H, W)`` bool mask per listed colour.

    Each pixel goes to the nearest listed colour (largest per-channel difference, 8-bit scale;
    16-bit files are divided by 257) when that difference is at most ``COLOUR_TOLERANCE`` (32,
    JPEG noise); black [0, 0, 0] is background, and so is a colour named "background". A grey
    file is read as RGB with equal channels.

    Args:
        path: the mask file.
        colours: {label name: [r, g, b]} (8-bit), e.g. ``{"artery": [255, 0, 0], "vein": [0, 0,
            255]}``; spec key ``mask_colors``.

    Returns:
        {label name: mask} for every listed colour but "background" (empty masks included).

    Raises:
        ValueError: more than 1% of the pixels are far from black and from every listed colour
            (a label missing from ``mask_colors``), naming the file and the unlisted colours.
    """
    arr = read_image(path)
    _check_finite(arr, path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    rgb = _to_8bit_scale(arr)
    names = list(colours)
    table = np.array([colours[n] for n in names] + [[0, 0, 0]], np.float64)  # (K + 1, 3)
    dist = np.stack([np.abs(rgb - c).max(axis=2) for c in table])  # (K + 1, H, W)
    nearest = dist.argmin(axis=0)
    near = dist.min(axis=0) <= COLOUR_TOLERANCE
    far = ~near
    if far.mean() > 0.01:
        raise ValueError(
            f"mask file {path}: {int(far.sum())} pixels ({100 * far.mean():.1f}%) are not within "
            f"{COLOUR_TOLERANCE} of black or of a colour in mask_colors {colours}; colours found "
            f"there: {_colours(np.round(rgb[far]).astype(np.int64)[:, None, :])}. Add each "
            "label's colour to mask_colors (a colour named background is background)."
        )
    return {n: near & (nearest == k) for k, n in enumerate(names) if n != "background"}


def read_fov(path: str | Path) -> np.ndarray:
    """Read a field-of-view mask as ``(H, W)`` bool: True (inside) where any channel is non-zero.

    Store it lossless (PNG, TIFF, GIF): JPEG noise in the dark outside would count as inside.
    """
    arr = read_image(path)
    _check_finite(arr, path)
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0
