"""Propagate a segmentation through a volume from a few prompted slices (SAM 2's video path).

    masks = propagate_volume(model, ct_volume, {40: Prompt(box=np.array([120, 80, 300, 260]))},
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
   earlier results of the pass, then p's (always, like SAM 2's conditioning frame), with SAM 2's
   temporal encodings (a result d slices back: slot d - 1; p: the last slot), and on the object
   pointers of p and of up to min(Z, 16) - 1 recent results (`sequence.Pass`), then the
   confidence bank's entries retrieved for z (`model.memory.retrieve`), and decoded with SAM 2's
   padding point as the only prompt, as its video path does (`model.decode(...,
   use_memory=False, pad_empty=True)`). Result: logits upsampled to
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

import contextlib
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from samed2_kit.model import _sam2
from samed2_kit.prompts import Prompt, check_prompt
from samed2_kit.types import ImageFeatures, Prompts
from samed2_kit.utils.modes import evaluation
from samed2_kit.volume.sequence import Pass, SliceResult, prompted, propagated

DIRECTIONS = ("both", "up", "down", "none")  # none: the prompted slices only


def volume_intensity(array: np.ndarray, modality: str = "auto", window=None,
                     percentiles=(0.5, 99.5)):  # fmt: skip
    """One intensity mapping for a whole volume (Z, H, W): returns f(z) -> slice z as (H, W)
    float32 in [0, 1]. `normalize_intensity`'s rules (`intensity_map`: modality "auto"/"ct"/"mr"/
    "2d", CT window (level, width) in HU, MR percentiles), with statistics over every voxel."""
    from samed2_kit.medbank.preprocess import check_intensities, intensity_map

    a = check_intensities(array, "volume")
    mapping = intensity_map(a, modality, window, percentiles)
    return lambda z: mapping(a[z])


def model_clip_len(model) -> int:
    """T adjacent slices per clip for the model's encoder: `model.spec.clip_len`, the recipe's
    `data.clip_len` the model was assembled with (saved in its manifest; 1 for 2D models)."""
    return int(model.spec.clip_len)


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

    def __init__(self, steps, slice01, n: int, t: int, batch: int, visits: list[int]):
        from samed2_kit.medbank.preprocess import to_model_input

        self.steps, self.n, self.t, self.batch = steps, n, t, batch
        self.prep = lambda z: to_model_input(np.repeat(slice01(z)[..., None], 3, 2),
                                             steps.image_size)  # fmt: skip
        self.uses = Counter(z // t for z in visits)
        self.cache: dict[int, ImageFeatures] = {}

    def _encode(self, chunks: list[int]) -> None:
        zs = [min(c * self.t + i, self.n - 1) for c in chunks for i in range(self.t)]
        x = torch.stack([self.prep(z) for z in zs]).to(self.steps.device)
        feats = self.steps.encode(x, self.t)
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


def _volume_array(volume, modality: str, window) -> tuple[np.ndarray, str]:
    """(the (Z, H, W) array, the modality to use: a Volume's meta["modality"] "CT"/"MR" when
    `modality` is "auto" and no window is given)."""
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
    return arr, modality


def _check_options(direction: str, memory_frames, batch, stop_after_empty, clip_len) -> None:
    """`direction` is one of DIRECTIONS and the integer options are integers >= their minimum."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: one of {DIRECTIONS}")
    ints = {"memory_frames": (memory_frames, 0), "batch": (batch, 1),
            "stop_after_empty": (stop_after_empty, 1), "clip_len": (clip_len, 1)}  # fmt: skip
    for name, (v, least) in ints.items():
        if v is not None and not (_is_int(v) and v >= least):
            raise ValueError(f"{name}={v!r}: give an integer >= {least}")


def _check_prompts(prompts: dict, n: int, h: int, w: int) -> dict[int, Prompt]:
    """{slice index z in 0..n-1: validated Prompt on the (h, w) slice}; empty prompts raise."""
    if not prompts:
        raise ValueError("prompts is empty: give {slice index: Prompt(...)} for >= 1 slice")
    checked = {}
    for z, p in prompts.items():
        if not (_is_int(z) and 0 <= z < n):
            raise ValueError(f"prompts: slice index {z!r} is not in 0..{n - 1}: Z = {n} slices")
        checked[int(z)] = check_prompt(p, (h, w), f"prompts[{z}]")
    return checked


def _run_pass(steps, feats_of: _Features, p: int, zs: list[int], start: SliceResult,
              out: np.ndarray, *, memory_frames: int, stop_after_empty: int | None, bar) -> None:  # fmt: skip
    """Propagate from prompted slice p (its result `start`) over `zs` (in visiting order) into
    `out` (Z, H, W) bool."""
    h, w = out.shape[1:]
    n = len(out)
    run = Pass(start, memory_frames, n, min(n, steps.max_obj_ptrs) - 1)  # = Pass.begin
    empty_run, step = 0, 1 if zs[0] > p else -1
    for i, z in enumerate(zs):
        mems, pointers = run.context()
        res = steps.propagated(feats_of.get(z, step), None if mems is None else mems[:, 0],
                               pointers)  # fmt: skip
        out[z] = _upsample(res.low_res_logits, h, w)
        run.add(res)
        bar.update(1)
        empty_run = 0 if out[z].any() else empty_run + 1
        if stop_after_empty is not None and empty_run >= stop_after_empty:
            feats_of.release(zs[i + 1 :])
            bar.update(len(zs) - i - 1)
            break


@torch.no_grad()
def propagate_volume(model, volume, prompts: dict, *, modality: str = "auto", window=None,
                     memory_frames: int = 6, direction: str = "both", batch: int = 4,
                     stop_after_empty: int | None = None, progress: bool = False,
                     clip_len: int | None = None, backend: str = "torch",
                     export_dir=None) -> np.ndarray:  # fmt: skip
    """Segment one object through a volume from prompts on some of its slices.

    Args:
        model: a SAMed2Model. volume: (Z, H, W) array (CT in HU) or a medbank `Volume` (its
            meta["modality"] "CT"/"MR" is used when modality is "auto").
        prompts: {slice index z: Prompt or a dict of its fields}, in pixels of slice z; a mask
            prompt (H, W) is taken as the slice's result.
        modality, window: intensity handling as in `Predictor.set_image`, over the whole volume.
        memory_frames: recent results each propagated slice attends to (besides the prompted
            slice of its pass); 0: no memory of this volume. direction: "both", "up" (towards
            higher z) or "down". batch: clips per encoder call. stop_after_empty: end a pass after
            this many consecutive empty slices (None: never). progress: a tqdm bar over slices.
        clip_len: T slices per encoder clip (None: `model_clip_len(model)`; with onnx, the
            exported model's).
        backend: "torch" (the model) or "onnx" (onnxruntime on the graphs of `export_dir`, a
            folder written by `samed2 export`; `model` is then unused and may be None, or an
            `samed2_kit.deploy.propagation.OnnxPropagation` to use instead of the folder). The
            onnx backend has no confidence bank and no prompt sources beyond what its graphs
            hold; CPU.

    Returns:
        (Z, H, W) bool mask on the volume's voxel grid (for a Volume: its geometry).
    """
    from tqdm.auto import tqdm

    arr, modality = _volume_array(volume, modality, window)
    n, h, w = arr.shape
    _check_options(direction, memory_frames, batch, stop_after_empty, clip_len)
    checked = _check_prompts(prompts, n, h, w)
    steps = _backend(model, backend, export_dir)
    starts = sorted(checked)
    passes = _passes(starts, n, direction)
    t = clip_len or steps.clip_len
    feats_of = _Features(steps, volume_intensity(arr, modality, window), n, t, batch,
                         starts + [z for _, zs in passes for z in zs])  # fmt: skip
    out = np.zeros((n, h, w), dtype=bool)
    total = len(starts) + sum(len(zs) for _, zs in passes)
    bar = tqdm(total=total, desc="propagate", unit="slice", disable=not progress)
    modes = evaluation(model) if backend == "torch" else contextlib.nullcontext()
    with modes, contextlib.closing(bar):
        start = {}
        for z in starts:  # prompted slices
            feats = feats_of.get(z)
            out[z], start[z] = _decode_prompted(steps, feats, checked[z], h, w)
            bar.update(1)
        for p, zs in passes:
            _run_pass(steps, feats_of, p, zs, start[p], out, memory_frames=memory_frames,
                      stop_after_empty=stop_after_empty, bar=bar)  # fmt: skip
    return out


class _TorchSteps:
    """The steps of propagation on the torch model (`volume.sequence`); `OnnxPropagation` has
    the same members on onnxruntime."""

    def __init__(self, model):
        self.model = model
        self.image_size = model.image_size
        self.clip_len = model_clip_len(model)
        self.max_obj_ptrs = model.sam.max_obj_ptrs_in_encoder
        self.device = next(model.parameters()).device

    def encode(self, images: torch.Tensor, clip_len: int) -> ImageFeatures:
        return self.model.encode(images, clip_len=clip_len)

    def prompted(self, feats: ImageFeatures, prompts: Prompts) -> SliceResult:
        return prompted(self.model, feats, prompts)

    def from_mask(self, feats: ImageFeatures, low: torch.Tensor, obj: torch.Tensor):
        # the pointer: the decoder run on the mask, gated by whether it holds the object
        sam = self.model.sam
        res = self.model.decode(feats, Prompts(masks=low), False)
        pointer = _sam2.object_pointer(sam, res.tokens, res.iou, obj)
        memory = _sam2.encode_memory(sam, feats, low, obj)
        return SliceResult(low, low, res.iou, obj, memory, pointer)

    def propagated(self, feats: ImageFeatures, memory, pointers) -> SliceResult:
        return propagated(self.model, feats, [memory], pointers=pointers)


BACKENDS = ("torch", "onnx")


def _backend(model, backend: str, export_dir):
    """The steps of `backend` for `model` / `export_dir` (`_TorchSteps` or `OnnxPropagation`)."""
    if backend == "torch":
        if model is None or not hasattr(model, "sam"):
            raise ValueError(
                f"backend='torch' needs a SAMed2Model, got {type(model).__name__}: load one, or "
                "use backend='onnx' with export_dir=<exported folder>"
            )
        return _TorchSteps(model)
    if backend != "onnx":
        raise ValueError(f"backend={backend!r}: one of {BACKENDS}")
    from samed2_kit.deploy.propagation import OnnxPropagation

    if isinstance(model, OnnxPropagation):
        return model
    if export_dir is None:
        raise ValueError(
            "backend='onnx' needs export_dir=<folder written by `samed2 export`> (or an "
            "OnnxPropagation as the model)"
        )
    return OnnxPropagation(export_dir)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _upsample(low: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(1, 1, S/4, S/4) logits -> (H, W) bool: bilinear, > 0 (as the Predictor does)."""
    up = F.interpolate(low.float(), size=(h, w), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).cpu().numpy()


def _decode_prompted(steps, feats: ImageFeatures, p: Prompt, h: int, w: int):
    """A prompted slice -> (result (H, W) bool, its SliceResult: memory features, pointer)."""
    s, dev = steps.image_size, feats.image_embed.device
    if p.mask is not None:  # SAM 2's mask-as-output: logits = mask * 20 - 10, score +-10
        m = torch.as_tensor(p.mask, dtype=torch.float32, device=dev)[None, None]
        low = F.interpolate(m, (s // 4, s // 4), mode="bilinear", antialias=True) * 20 - 10
        obj = torch.full((1, 1), 10.0 if p.mask.any() else -10.0, device=dev)
        return p.mask.copy(), steps.from_mask(feats, low, obj)
    scale = np.array([s / w, s / h], dtype=np.float32)  # slice pixels -> model-input pixels
    pts = lab = box = refine = None
    if p.mask_input is not None:  # an earlier mask refined by the points/box (SAM 2's rule)
        m = torch.as_tensor(p.mask_input, dtype=torch.float32, device=dev)[None, None]
        refine = F.interpolate(m, (s // 4, s // 4), mode="bilinear", antialias=True) * 20 - 10
    if p.points is not None:
        pts = torch.from_numpy(p.points * scale)[None].to(dev)
        lab = torch.from_numpy(p.labels.astype(np.int64))[None].to(dev)
    if p.box is not None:
        box = torch.from_numpy((p.box.reshape(2, 2) * scale).reshape(1, 4)).to(dev)
    res = steps.prompted(feats, Prompts(pts, lab, box, refine))
    return _upsample(res.low_res_logits, h, w), res
