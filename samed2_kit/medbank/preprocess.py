"""Modality-aware intensity normalisation and resizing to SAM 2's input.

Shared by the notebook predictor and the training dataset, so that both feed the model exactly
the same pixels: ``normalize_intensity`` -> ``(H, W, 3)`` float32 in [0, 1], then
``to_model_input`` -> ``(3, S, S)`` ImageNet-normalised tensor, as SAM 2's own transforms do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CT_WINDOW = (40.0, 400.0)  # (level, width) in HU: soft-tissue window
MODALITY_ALIASES = {
    "auto": "auto",
    "ct": "ct",
    "mr": "mr",
    "mri": "mr",
    "2d": "2d",
    **{
        name: "2d"
        for name in ("rgb", "us", "xray", "endoscopy", "dermoscopy", "fundus", "pathology")
    },
}


def canonical_modality(modality: str) -> str:
    """Map a modality name or alias to one of "auto", "ct", "mr", "2d" (ValueError otherwise)."""
    key = str(modality).lower()
    if key not in MODALITY_ALIASES:
        raise ValueError(
            f"unknown modality {modality!r}; valid names: {sorted(MODALITY_ALIASES)} "
            "(ultrasound, X-ray, endoscopy, dermoscopy, fundus, pathology and RGB all mean '2d')"
        )
    return MODALITY_ALIASES[key]


def _to_three_channels(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image array has shape {x.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )
    if x.shape[2] == 4:
        x = x[:, :, :3]
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return x


def _min_max(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def check_intensities(array: np.ndarray, what: str = "image array") -> np.ndarray:
    """`array` as an integer or float array (bool -> uint8 0/255); ValueError for other dtypes and
    for NaN or infinite values. `what` names the array in errors."""
    x = np.asarray(array)
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    if x.dtype.kind not in "uif":
        raise ValueError(f"{what} has dtype {x.dtype}; expected an integer or float type")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise ValueError(f"{what} holds NaN or infinite values; replace them before normalising")
    return x


@dataclass(frozen=True)
class IntensityMap:
    """A modality's mapping of intensities to float32 [0, 1], fixed by `intensity_map`.

    rule "range": ``(clip(x, lo, hi) - lo) / scale`` in float64 (zeros where scale <= 0, a
    constant image); "uint8": ``x / 255`` in float32; "as_is": ``x`` as float32 (a float image
    already in [0, 1]). ``modality`` is the resolved one: "ct", "mr" or "2d".
    """

    modality: str
    rule: str = "range"
    lo: float = 0.0
    hi: float = 1.0
    scale: float = 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Map an array of any shape (an image, one slice, a whole volume) -> float32, same shape."""
        if self.rule == "uint8":
            return x.astype(np.float32) / 255.0
        if self.rule == "as_is":
            return x.astype(np.float32)
        if self.scale <= 0:
            return np.zeros(x.shape, np.float32)
        x64 = np.asarray(x, dtype=np.float64)
        return ((np.clip(x64, self.lo, self.hi) - self.lo) / self.scale).astype(np.float32)


def intensity_map(
    x: np.ndarray,
    modality: str = "auto",
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
    *,
    rgb: bool = False,
) -> IntensityMap:
    """The intensity mapping of `normalize_intensity`'s rules, with statistics over all of `x`.

    Args:
        x: intensities of any shape (an (H, W, 3) image, a (Z, H, W) volume), integer or float
            (see `check_intensities`); CT in HU. MR percentiles are taken in x's dtype; min/max
            are exact in any dtype.
        modality, window, percentiles: as in `normalize_intensity`.
        rgb: x has 3 or more colour channels ("auto" then means 2d).

    Returns:
        an `IntensityMap`; apply it to x (or to parts of x, e.g. one slice of the volume).
    """
    mod = canonical_modality(modality)
    if mod == "auto":
        if window is not None:
            mod = "ct"
        elif x.dtype == np.uint8 or rgb:
            mod = "2d"
        elif x.dtype.kind in "if" and float(x.min()) < -100:
            mod = "ct"
        else:
            mod = "2d"
    if window is not None and mod != "ct":
        raise ValueError(f"window={window} is for CT only, but modality is {modality!r}")
    if mod == "ct":
        level, width = window if window is not None else DEFAULT_CT_WINDOW
        if width <= 0:
            raise ValueError(f"CT window width must be > 0 HU, got window={window}")
        lo = level - width / 2.0
        return IntensityMap("ct", "range", lo, lo + width, width)
    if mod == "mr":
        p_lo, p_hi = percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        lo, hi = np.percentile(x, [p_lo, p_hi])
        return IntensityMap("mr", "range", lo, hi, hi - lo)
    if x.dtype == np.uint8:
        return IntensityMap("2d", "uint8")
    if x.dtype.kind == "f" and float(x.min()) >= 0.0 and float(x.max()) <= 1.0:
        return IntensityMap("2d", "as_is")
    lo, hi = float(x.min()), float(x.max())
    return IntensityMap("2d", "range", lo, hi, hi - lo)


def normalize_intensity(
    array: np.ndarray,
    modality: str = "auto",
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
) -> np.ndarray:
    """Scale an image to ``(H, W, 3)`` float32 in [0, 1] by modality.

    Args:
        array: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped); CT in HU.
        modality: "ct", "mr", "2d" (aliases rgb, us, xray, endoscopy, dermoscopy, fundus,
            pathology) or "auto": uint8 or 3-channel -> 2d; signed ints or floats with
            min < -100 -> ct (HU); otherwise 2d. A ``window`` with "auto" means ct.
        window: CT ``(level, width)`` in HU, default (40, 400); values are clipped to
            [level - width/2, level + width/2] and scaled to [0, 1]. CT only.
        percentiles: MR clip range in percent (of the float64 values of all channels); clipped
            values are scaled to [0, 1].

    2D rule: uint8 -> /255; a float image already in [0, 1] -> as is; other ints (uint16 ...)
    and floats -> min-max over all channels. A constant image under min-max (or MR percentiles)
    gives zeros. Grey input is replicated to 3 channels. The rules are `intensity_map`'s, which
    `samed2_kit.volume.volume_intensity` applies with statistics over a whole volume.
    """
    x = check_intensities(array)
    channels = x.shape[2] if x.ndim == 3 else 1
    mod = canonical_modality(modality)
    x = _to_three_channels(x)
    if mod == "mr":
        x = x.astype(np.float64)  # MR percentiles of the float64 values
    return intensity_map(x, modality, window, percentiles, rgb=channels >= 3)(x)


def to_model_input(image01: np.ndarray, size: int):
    """Resize an ``(H, W, 3)`` float image in [0, 1] to ``(3, size, size)`` float32, ImageNet-normalised.

    Bilinear resize with antialiasing (``align_corners=False``), then ``(x - mean) / std`` with
    mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225): what SAM 2's transforms do.
    The aspect ratio is not kept (SAM 2 squashes to a square too).
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(image01), dtype=torch.float32)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(
            f"to_model_input expects an (H, W, 3) image in [0, 1], got shape {tuple(x.shape)}; "
            "call normalize_intensity first"
        )
    x = x.permute(2, 0, 1)[None]
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std)[0].contiguous()


def to_model_input_batch(images01: Sequence[np.ndarray], size: int):
    """Stack :func:`to_model_input` over images of any sizes -> ``(B, 3, size, size)`` float32."""
    import torch

    return torch.stack([to_model_input(im, size) for im in images01])


def resize_mask(mask: np.ndarray, size: int):
    """Resize an ``(H, W)`` bool mask to a ``(1, size, size)`` float32 tensor of {0, 1}.

    Area interpolation (the fraction of each output pixel covered by the mask), kept where the
    coverage is >= 0.5; upsampling replicates pixels (like nearest). If that rule would erase a
    non-empty mask (a structure thinner than one output pixel), every output pixel with any
    coverage is kept instead, so a non-empty mask stays non-empty.
    """
    import torch
    import torch.nn.functional as F

    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"resize_mask expects an (H, W) mask, got shape {m.shape}")
    t = torch.as_tensor(m.astype(np.float32))[None, None]
    cover = F.interpolate(t, size=(size, size), mode="area")
    out = (cover >= 0.5).float()
    if out.sum() == 0 and m.any():
        out = (cover > 0).float()
    return out[0]


def volume_to_uint8(array: np.ndarray, modality: str, intensity) -> np.ndarray:
    """A whole volume (Z, Y, X) or (Z, Y, X, 3) to 8-bit, by `intensity` (a medbank IntensitySpec).

    Statistics (percentiles, z-score mean/std) are taken over the whole volume, so all slices of a
    case share one mapping. CT windows are in HU; z-scores in [-3, 3] map to [0, 255].
    """
    mode = intensity.mode
    if mode == "auto":
        mode = {"ct": "window", "mr": "percentile", "pet": "percentile"}.get(modality, "as_is")
    a = np.asarray(array)
    if mode == "as_is":
        if a.dtype == np.uint8:
            return a
        return (_min_max(a.astype(np.float32)) * 255).round().astype(np.uint8)
    a = a.astype(np.float32)
    if mode == "window":
        level, width = intensity.window or DEFAULT_CT_WINDOW
        lo, hi = level - width / 2, level + width / 2
    elif mode == "percentile":
        lo, hi = np.percentile(a, intensity.percentiles)
    else:  # zscore
        lo_c, hi_c = intensity.clip or (-1000.0, 1000.0)
        a = np.clip(a, lo_c, hi_c)
        a = (a - a.mean()) / max(float(a.std()), 1e-6)
        lo, hi = -3.0, 3.0
    scaled = (np.clip(a, lo, hi) - lo) / max(float(hi - lo), 1e-6)
    return (scaled * 255).round().astype(np.uint8)
