"""Propagate a segmentation through a volume from a few prompted slices (SAM 2's video path).

    masks = propagate_volume(model, ct_volume, {40: SlicePrompt(box=np.array([120, 80, 300, 260]))},
                             modality="ct", window=(40, 400))          # (Z, H, W) bool

Algorithm, for a volume (Z, H, W) (axis 0 = slices; "up" = towards higher slice indices):

1. Intensity: one mapping for the whole volume (CT window in HU, MR percentiles or 2D min-max over
   every voxel: `normalize_intensity`'s rules; it takes one 2D image), then each slice to the
   model input (3, S, S) with `to_model_input`, as the Predictor does.
2. Encoder: clips of T adjacent slices (T = `model_clip_len(model)`, 1 without temporal adapters):
   non-overlapping chunks [0, T), [T, 2T) ..., the last padded by repeating the edge slice, `batch`
   clips per `model.encode(x, clip_len=T)`; encoded lazily, freed once no planned slice needs them.
3. Prompted slices: `model.decode` with their points/box, single mask (confidence memory and
   prompt sources apply as in 2D prediction; the result equals the Predictor's: logits upsampled
   bilinearly to (H, W), > 0). A `mask` prompt is the slice's result (its logits: the mask resized
   to S/4, * 20 - 10, SAM 2's rule). Memory features: `_sam2.encode_memory` on the slice's
   *encoder* features with its logits and object score.
4. Passes: from each prompted slice p, up and/or down. Slice z's encoder features are conditioned
   by `_sam2.attend_memory` on (most recent first) the memory features of up to `memory_frames`
   earlier results of the pass, then p's (always, the oldest entry, like SAM 2's conditioning
   frame), then the confidence bank's entries retrieved for z (`model.memory.retrieve`), and
   decoded with no prompt (`model.decode(..., use_memory=False)`). Result: logits upsampled to
   (H, W) > 0, empty where the object score <= 0; its memory features (logits gated to "no
   object" in that case, as SAM 2 does) join the pass's queue. `memory_frames=0`: no memory of
   this volume at all (each slice decoded from its own features, plus the bank if any).
5. Several prompted slices: a slice between two takes the result of the nearer one's pass (a tie:
   the lower one); a pass stops at the slice it no longer owns (with one direction, at the next
   prompted slice). `stop_after_empty=N` ends a pass after N consecutive empty results.

The model runs in eval mode under `torch.no_grad()`; every module's training flag is restored
afterwards, and the confidence bank is only read.
"""

from __future__ import annotations

import warnings
from collections import Counter, deque
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from samed2_kit.model import _sam2
from samed2_kit.model._sam2 import ImageFeatures

DIRECTIONS = ("both", "up", "down")
NO_OBJECT_LOGIT = -1024.0  # sam2's NO_OBJ_SCORE: mask logits of a slice without the object


@dataclass
class SlicePrompt:
    """A prompt on one slice, in pixels of that slice: x = column, y = row (like `Predictor`).

    points: (N, 2) x, y; labels: (N,) 1 foreground / 0 background; box: (4,) x0, y0, x1, y1;
    mask: (H, W) bool, an existing mask of the slice (taken as its result; empty = no object).
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask: np.ndarray | None = None


def _check_prompt(z: int, p, h: int, w: int) -> SlicePrompt:
    """A validated copy of prompt `p` (SlicePrompt or dict) on slice z of an (H, W) slice grid."""
    where = f"prompts[{z}]"
    if isinstance(p, dict):
        names = {f.name for f in fields(SlicePrompt)}
        if set(p) - names:
            raise ValueError(f"{where}: unknown keys {sorted(set(p) - names)}; use {sorted(names)}")
        p = SlicePrompt(**p)
    elif not isinstance(p, SlicePrompt):
        raise ValueError(f"{where} is a {type(p).__name__}: give a SlicePrompt or a dict")
    pts = None if p.points is None else np.asarray(p.points, np.float32).reshape(-1, 2)
    pts = None if pts is not None and not len(pts) else pts
    box = None if p.box is None else np.asarray(p.box, np.float32)
    if pts is None and box is None and p.mask is None:
        raise ValueError(f"{where} is empty: give points (+ labels), a box or a mask")
    if p.mask is not None:
        mask = np.asarray(p.mask)
        if mask.shape != (h, w):
            raise ValueError(f"{where}.mask is {mask.shape}, the slice is {(h, w)}: give (H, W)")
        if pts is not None or box is not None:
            raise ValueError(f"{where}: a mask is the slice's result; give it without points/box")
        return SlicePrompt(mask=mask if mask.dtype == bool else mask > 0)
    labels = None
    if pts is not None:
        if p.labels is None:
            raise ValueError(f"{where}.labels missing: give one label per point (1 fg, 0 bg)")
        labels = np.asarray(p.labels).reshape(-1)
        if len(labels) != len(pts) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"{where}.labels must be {len(pts)} values of 1 (fg) or 0 (bg)")
    if box is not None and box.size != 4:
        raise ValueError(f"{where}.box has {box.size} values: give (x0, y0, x1, y1)")
    for name, xy in (("points", pts), ("box", None if box is None else box.reshape(2, 2))):
        if xy is not None and ((xy < 0) | (xy > [w, h])).any():
            raise ValueError(
                f"{where}.{name} {xy.tolist()} lies outside the {w}x{h} (WxH) slice: coordinates "
                "are (x, y) in pixels of the slice, x in [0, W], y in [0, H]"
            )
    return SlicePrompt(points=pts, labels=labels, box=None if box is None else box.reshape(4))


def volume_intensity(array: np.ndarray, modality: str = "auto", window=None,
                     percentiles=(0.5, 99.5)):  # fmt: skip
    """One intensity mapping for a whole volume (Z, H, W): returns f(z) -> slice z as (H, W)
    float32 in [0, 1]. The rules of `normalize_intensity` (modality "auto"/"ct"/"mr"/"2d", CT
    window (level, width) in HU, MR percentiles), with statistics over every voxel."""
    from samed2_kit.medbank.preprocess import DEFAULT_CT_WINDOW, canonical_modality

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype.kind not in "uif":
        raise ValueError(f"volume has dtype {a.dtype}; expected an integer or float type")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError("volume holds NaN or infinite values; replace them first")
    mod = canonical_modality(modality)
    if mod == "auto":
        hu = a.dtype.kind in "if" and float(a.min()) < -100
        mod = "ct" if window is not None or hu else "2d"
    if window is not None and mod != "ct":
        raise ValueError(f"window={window} is for CT only, but modality is {modality!r}")
    lo, hi = 0.0, 1.0  # as is: a float volume already in [0, 1]
    if mod == "ct":
        level, width = window if window is not None else DEFAULT_CT_WINDOW
        if width <= 0:
            raise ValueError(f"CT window width must be > 0 HU, got window={window}")
        lo = level - width / 2.0
        hi = lo + width
    elif mod == "mr":
        lo, hi = (float(v) for v in np.percentile(a, percentiles))
    elif a.dtype != np.uint8 and not (a.dtype.kind == "f" and a.min() >= 0 and a.max() <= 1):
        lo, hi = float(a.min()), float(a.max())  # 2D min-max
    scale = width if mod == "ct" else hi - lo

    def slice01(z: int) -> np.ndarray:
        x = a[z]
        if mod == "2d" and a.dtype == np.uint8:
            return x.astype(np.float32) / 255.0
        if scale <= 0:  # a constant volume
            return np.zeros(x.shape, np.float32)
        return ((np.clip(x.astype(np.float64), lo, hi) - lo) / scale).astype(np.float32)

    return slice01


def model_clip_len(model) -> int:
    """T adjacent slices per clip for the model's encoder: `model.adapter_config["clip_len"]` (or
    its attribute `clip_len`) when set, else 1. Neither the state dict nor the temporal-adapter
    config records T (the recipe's `data.clip_len`; `load_model` sets it from the saved recipe), so a model with temporal
    adapters and no `adapter_config` gets 1 and a warning: pass `clip_len=` then."""
    from samed2_kit.adapters.temporal import ADAPTER_NAME

    cfg = getattr(model, "adapter_config", None)
    t = cfg.get("clip_len") if isinstance(cfg, dict) else getattr(cfg, "clip_len", None)
    if t is not None:
        return int(t)
    if any(hasattr(b, ADAPTER_NAME) for b in model.encoder_blocks):
        warnings.warn(
            "the model has temporal adapters but no recorded clip length: encoding single "
            "slices (T=1); pass clip_len=T (the recipe's data.clip_len)",
            stacklevel=2,
        )
    return 1


def _passes(starts: list[int], n: int, direction: str) -> list[tuple[int, list[int]]]:
    """(prompted slice, the slices its pass owns in visiting order) for each non-empty pass."""
    out = []
    for i, p in enumerate(starts):
        below = starts[i - 1] if i else None
        above = starts[i + 1] if i + 1 < len(starts) else None
        if direction in ("both", "up"):
            end = n - 1 if above is None else above - 1
            end = p + (above - p) // 2 if direction == "both" and above is not None else end
            out.append((p, list(range(p + 1, end + 1))))
        if direction in ("both", "down"):
            end = 0 if below is None else below + 1
            end = below + (p - below) // 2 + 1 if direction == "both" and below is not None else end
            out.append((p, list(range(p - 1, end - 1, -1))))
    return [(p, zs) for p, zs in out if zs]


class _Features:
    """Encoder features per slice, encoded lazily in clips of T and freed after their last use."""

    def __init__(self, model, slice01, n: int, t: int, batch: int, visits: list[int]):
        from samed2_kit.medbank.preprocess import to_model_input

        self.model, self.n, self.t, self.batch = model, n, t, batch
        self.prep = lambda z: to_model_input(np.repeat(slice01(z)[..., None], 3, 2),
                                             model.image_size)  # fmt: skip
        self.uses = Counter(z // t for z in visits)
        self.cache: dict[int, ImageFeatures] = {}
        self.device = next(model.parameters()).device

    def _encode(self, chunks: list[int]) -> None:
        zs = [min(c * self.t + i, self.n - 1) for c in chunks for i in range(self.t)]
        x = torch.stack([self.prep(z) for z in zs]).to(self.device)
        feats = self.model.encode(x, clip_len=self.t)
        for k, c in enumerate(chunks):
            self.cache[c] = feats.select(slice(k * self.t, (k + 1) * self.t))

    def get(self, z: int, step: int = 1) -> ImageFeatures:
        """Slice z's features (1 image); a miss encodes its chunk and the next `batch - 1`
        chunks still needed in the direction `step`."""
        c = z // self.t
        if c not in self.cache:
            ahead = range(c + step, -1 if step < 0 else self.n, step)
            more = [k for k in ahead if self.uses[k] > 0 and k not in self.cache]
            self._encode(sorted([c, *more[: self.batch - 1]]))
        feats = self.cache[c].select(slice(z % self.t, z % self.t + 1))
        self.release([z])
        return feats

    def release(self, zs) -> None:
        for z in zs:
            self.uses[z // self.t] -= 1
            if self.uses[z // self.t] <= 0:
                self.cache.pop(z // self.t, None)


@torch.no_grad()
def propagate_volume(model, volume, prompts: dict, *, modality: str = "auto", window=None,
                     memory_frames: int = 6, direction: str = "both", batch: int = 4,
                     stop_after_empty: int | None = None, progress: bool = False,
                     clip_len: int | None = None) -> np.ndarray:  # fmt: skip
    """Segment one object through a volume from prompts on some of its slices.

    Args:
        model: a SAMed2Model. volume: (Z, H, W) array (CT in HU) or a medbank `Volume` (its
            meta["modality"] "CT"/"MR" is used when modality is "auto").
        prompts: {slice index z: SlicePrompt or a dict of its fields}, pixels of slice z.
        modality, window: intensity handling as in `Predictor.set_image`, over the whole volume.
        memory_frames: recent results each propagated slice attends to (besides the prompted
            slice of its pass); 0: no memory of this volume. direction: "both", "up" (towards
            higher z) or "down". batch: clips per encoder call. stop_after_empty: end a pass after
            this many consecutive empty slices (None: never). progress: a tqdm bar over slices.
        clip_len: T slices per encoder clip (None: `model_clip_len(model)`).

    Returns:
        (Z, H, W) bool mask on the volume's voxel grid (for a Volume: its geometry).
    """
    from tqdm.auto import tqdm

    from samed2_kit.medbank.io.volume import Volume

    if isinstance(volume, Volume):
        mod = str(volume.meta.get("modality", "")).lower()
        modality = (
            mod if modality == "auto" and window is None and mod in ("ct", "mr") else modality
        )
        volume = volume.array
    arr = np.asarray(volume)
    if arr.ndim != 3:
        raise ValueError(f"volume must be (Z, H, W) (one grey channel), got shape {arr.shape}")
    n, h, w = arr.shape
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: one of {DIRECTIONS}")
    ints = {"memory_frames": (memory_frames, 0), "batch": (batch, 1),
            "stop_after_empty": (stop_after_empty, 1), "clip_len": (clip_len, 1)}  # fmt: skip
    for name, (v, least) in ints.items():
        if v is not None and not (_is_int(v) and v >= least):
            raise ValueError(f"{name}={v!r}: give an integer >= {least}")
    if not prompts:
        raise ValueError("prompts is empty: give {slice index: SlicePrompt(...)} for >= 1 slice")
    checked = {}
    for z, p in prompts.items():
        if not (_is_int(z) and 0 <= z < n):
            raise ValueError(f"prompts: slice index {z!r} is not in 0..{n - 1}: Z = {n} slices")
        checked[int(z)] = _check_prompt(int(z), p, h, w)
    starts = sorted(checked)
    passes = _passes(starts, n, direction)
    t = clip_len or model_clip_len(model)
    feats_of = _Features(model, volume_intensity(arr, modality, window), n, t, batch,
                         starts + [z for _, zs in passes for z in zs])  # fmt: skip
    out = np.zeros((n, h, w), dtype=bool)
    flags = [(m, m.training) for m in model.modules()]
    total = len(starts) + sum(len(zs) for _, zs in passes)
    bar = tqdm(total=total, desc="propagate", unit="slice", disable=not progress)
    try:
        model.eval()
        start_mem = {}
        for z in starts:  # prompted slices
            feats = feats_of.get(z)
            out[z], start_mem[z] = _decode_prompted(model, feats, checked[z], h, w)
            bar.update(1)
        for p, zs in passes:
            recent: deque[torch.Tensor] = deque(maxlen=memory_frames)  # most recent first
            empty_run, step = 0, 1 if zs[0] > p else -1
            for i, z in enumerate(zs):
                feats = feats_of.get(z, step)
                mems = [*recent, start_mem[p]] if memory_frames else []
                out[z], mem = _decode_propagated(model, feats, mems, h, w)
                recent.appendleft(mem)
                bar.update(1)
                empty_run = 0 if out[z].any() else empty_run + 1
                if stop_after_empty is not None and empty_run >= stop_after_empty:
                    feats_of.release(zs[i + 1 :])
                    bar.update(len(zs) - i - 1)
                    break
    finally:
        bar.close()
        for m, flag in flags:
            m.training = flag
    return out


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _upsample(low: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(1, 1, S/4, S/4) logits -> (H, W) bool: bilinear, > 0 (as the Predictor does)."""
    up = F.interpolate(low.float(), size=(h, w), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).cpu().numpy()


def _decode_prompted(model, feats: ImageFeatures, p: SlicePrompt, h: int, w: int):
    """A prompted slice -> (result (H, W) bool, memory features (mem_dim, h', w'))."""
    from samed2_kit.model.wrapper import Prompts

    s, dev = model.image_size, feats.image_embed.device
    if p.mask is not None:  # SAM 2's mask-as-output: logits = mask * 20 - 10, score +-10
        m = torch.as_tensor(p.mask, dtype=torch.float32, device=dev)[None, None]
        low = F.interpolate(m, (s // 4, s // 4), mode="bilinear", antialias=True) * 20 - 10
        obj = torch.full((1, 1), 10.0 if p.mask.any() else -10.0, device=dev)
        return p.mask.copy(), _sam2.encode_memory(model.sam, feats, low, obj)[0]
    scale = np.array([s / w, s / h], dtype=np.float32)  # slice pixels -> model-input pixels
    pts = lab = box = None
    if p.points is not None:
        pts = torch.from_numpy(p.points * scale)[None].to(dev)
        lab = torch.from_numpy(p.labels.astype(np.int64))[None].to(dev)
    if p.box is not None:
        box = torch.from_numpy((p.box.reshape(2, 2) * scale).reshape(1, 4)).to(dev)
    res = model.decode(feats, Prompts(pts, lab, box), False)
    low, obj = res.low_res_logits, res.object_score_logits
    return _upsample(low, h, w), _sam2.encode_memory(model.sam, feats, low, obj)[0]


def _decode_propagated(model, feats: ImageFeatures, mems: list[torch.Tensor], h: int, w: int):
    """An unprompted slice conditioned on `mems` (each (mem_dim, h', w'), most relevant first)
    plus the confidence bank's entries for it -> (result (H, W) bool, memory features)."""
    from samed2_kit.model.wrapper import Prompts

    sam = model.sam
    bank = model.memory.retrieve(sam, feats, {})[0] if model.memory is not None else None
    if bank is not None:  # (n, mem_dim, h', w'), read only
        mems = [*mems, *bank]
    cond = feats
    if mems:
        embed = _sam2.attend_memory(sam, feats, torch.stack(mems)[None])
        cond = ImageFeatures(embed.to(feats.image_embed.dtype), feats.high_res, feats.pos)
    res = model.decode(cond, Prompts(), False, use_memory=False)
    present = res.object_score_logits > 0  # (1, 1)
    low = torch.where(present[..., None, None], res.low_res_logits, NO_OBJECT_LOGIT)
    return _upsample(low, h, w), _sam2.encode_memory(sam, feats, low, res.object_score_logits)[0]
