"""Predictor: prompt a model with points, boxes and masks from a notebook.

The contract of sam2's `SAM2ImagePredictor` (set_image once, predict many times; masks at the
original resolution, scores, low-res logits), without importing torchvision, and with
modality-aware intensity handling for medical images.

    pred = Predictor(build_model("tiny", checkpoint="sam2.1_hiera_tiny.pt"))
    pred.set_image(ct_slice_hu, modality="ct", window=(40, 400))
    masks, scores, logits = pred.predict(box=[120, 80, 300, 260], multimask_output=False)

Few-shot (a model with the `hard_prototypes` source): give one or more annotated supports, then
predict query images with no prompt, or with points/boxes as well:

    pred.set_support(support_image, support_mask)
    pred.set_image(query_image)
    masks, scores, logits = pred.predict(multimask_output=False)

Backends: `Predictor(model)` runs the torch model; `Predictor(export_dir, backend="onnx")` runs
the graphs of an export folder (`samed2 export`) through onnxruntime, with the same preprocessing
and postprocessing code, hence the same outputs (low-res logits within ~1e-6, docs/deploy.md):

    pred = Predictor("runs/a-onnx", backend="onnx")   # or an `OnnxModel(dir, providers=...)`
    pred = Predictor(model, backend="onnx")           # exports `model` into a temporary folder

Images (`check_image`): (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA (the alpha
channel is dropped, with a logged note); each side at least `MIN_IMAGE_SIDE` (8) px; integer,
bool or float pixels, all finite. Prompts follow `samed2_kit.prompts.check_prompt`'s rules
(empty = left out, box corners in any order, points without labels are foreground).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from samed2_kit.model.image_input import MIN_IMAGE_SIDE, check_clip, check_image
from samed2_kit.model.wrapper import Prompts, SAMed2Model
from samed2_kit.prompts import Prompt, check_prompt, is_given
from samed2_kit.types import ImageFeatures

# predict()'s argument names, for check_prompt's errors
PREDICT_NAMES = {"points": "point_coords", "labels": "point_labels"}
BACKENDS = ("auto", "torch", "onnx")
__all__ = ["BACKENDS", "MIN_IMAGE_SIDE", "Predictor", "check_image", "max_supports"]



class Predictor:
    """Cache the image embedding of one image, answer prompts on it.

    Args:
        model: a `SAMed2Model`; with backend="onnx" also an export folder (`samed2 export`) or
            a `samed2_kit.deploy.runtime.OnnxModel` (its providers and threads). A model given
            with backend="onnx" is exported into a temporary folder first (removed when the
            predictor is garbage-collected): export once with `samed2 export` to reuse it.
        mask_threshold: logit threshold of the returned masks.
        backend: "torch" or "onnx" (needs the `export` extra: onnxruntime). The onnx backend
            has no few-shot path (`set_support`): the export leaves support-reading sources out.
            "auto" (default): onnx for an export folder or an OnnxModel (the faster backend at
            the same results, docs/deploy.md), torch for a SAMed2Model or a run folder (loaded).
    """

    def __init__(
        self, model: SAMed2Model | str | Path, mask_threshold: float = 0.0, backend: str = "auto"
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
        if backend == "auto":
            model, backend = _auto_backend(model)
        self.backend = backend
        self.onnx = None  # samed2_kit.deploy.runtime.OnnxModel (backend="onnx")
        if backend == "onnx":
            self.onnx, tmp = _onnx_model(model)
            if tmp is not None:  # the temporary export goes with the predictor
                import shutil
                import weakref

                weakref.finalize(self, shutil.rmtree, tmp, True)
            model = None
        elif not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"Predictor(backend='torch') takes a SAMed2Model, got {type(model).__name__}: "
                "load a run folder with samed2_kit.model.assemble.load(RUN), or pass an export "
                "folder with backend='onnx'"
            )
        self.model = model  # None with backend="onnx"
        self.mask_threshold = mask_threshold
        self._features: ImageFeatures | dict | None = None
        self._orig_hw: tuple[int, int] | None = None
        self._support = None  # samed2_kit.sources.Support, from set_support
        # (points (N, 2) x, y in image pixels, labels (N,)) a few-shot source prompted the last
        # predict() with (None when the caller's prompt was used)
        self.suggested_clicks: tuple[np.ndarray, np.ndarray] | None = None
        self.encoder_calls = 0  # how many times the image encoder ran (tests check the cache)

    @property
    def clip_len(self) -> int:
        """T slices per encoder clip: > 1 for a model with temporal adapters (see `set_image`);
        with backend="onnx", the export's clip encoder's T (1 without one)."""
        if self.onnx is not None:
            return self.onnx.clip_len
        return int(self.model.spec.clip_len)

    @property
    def image_size(self) -> int:
        """S, the model's input side in px."""
        return self.onnx.image_size if self.onnx is not None else int(self.model.image_size)

    @property
    def device(self) -> torch.device:
        if self.onnx is not None:
            return torch.device("cpu")  # where the arrays live; onnxruntime runs them
        return next(self.model.parameters()).device

    @torch.no_grad()
    def set_image(
        self,
        image: np.ndarray,
        modality: str = "auto",
        window: tuple[float, float] | None = None,
        neighbors: np.ndarray | None = None,
    ) -> None:
        """Encode `image` once.

        Args:
            image: (H, W) grey or (H, W, 3) RGB; uint8, uint16 or float (CT in HU); (H, W, 4)
                RGBA loses its alpha channel (logged). At least 8 px a side, no NaN/infinity
                (`check_image`).
            modality: "auto", "ct" (window by level/width in HU), "mr" (percentile clip) or "2d"
                (as is); see `samed2_kit.medbank.preprocess.normalize_intensity`.
            window: CT (level, width) in HU, default (40, 400).
            neighbors: for a model with temporal adapters (T = `model.spec.clip_len` > 1), the
                clip of T adjacent slices the image is the centre of ((T, H, W[, 3]), the image
                at position T // 2), each slice's intensity handled like the image. None: the
                image repeated T times (the clip a 2D image has in training). Ignored at T = 1.
        """
        from samed2_kit.medbank.preprocess import normalize_intensity, to_model_input

        image = check_image(image, "set_image")
        t = self.clip_len
        clip = [image] * t
        if neighbors is not None and t > 1:
            clip = [check_image(c, f"set_image: neighbors[{i}]", note_alpha=False)
                    for i, c in enumerate(check_clip(neighbors, image, t))]  # fmt: skip
        size = self.image_size
        x = torch.stack([to_model_input(normalize_intensity(c, modality=modality, window=window),
                                        size) for c in clip]).to(self.device)  # fmt: skip
        if self.onnx is not None:
            self._features = self.onnx.encode(x.numpy())
        else:
            self.model.eval()
            self._features = self.model.encode(x, clip_len=t).select(slice(t // 2, t // 2 + 1))
        self._orig_hw = image.shape[:2]
        self.encoder_calls += 1

    def reset_image(self) -> None:
        self._features, self._orig_hw = None, None

    @torch.no_grad()
    def set_support(
        self,
        images,
        masks,
        modality: str = "auto",
        window: tuple[float, float] | None = None,
    ) -> None:
        """Annotated support examples for few-shot prediction (replacing earlier ones).

        Args:
            images: one image (H, W) / (H, W, 3) array, or a list of them (any sizes; each
                checked as `set_image` checks its image).
            masks: the matching (H, W) masks (bool or 0/1), one per image, each the size of
                its image.
            modality, window: intensity handling, as in `set_image`.
        """
        from samed2_kit.medbank.preprocess import normalize_intensity, resize_mask, to_model_input

        if self.onnx is not None:
            raise ValueError(
                "set_support is not available with backend='onnx': the export leaves the "
                "support-reading sources (few-shot) out; use Predictor(model) (backend='torch') "
                "for few-shot prediction"
            )
        readers = self.model.support_sources()
        if not readers:
            raise ValueError(
                "set_support needs a model with a prompt source that reads supports (e.g. "
                "hard_prototypes): train one with a recipe that sets sources.hard_prototypes "
                "(e.g. recipes/few_shot.yaml)"
            )
        if isinstance(images, np.ndarray):  # one support; a list/tuple holds several
            images, masks = [images], [masks]
        images, masks = list(images), list(masks)
        limit, limited_by = max_supports(self.model)
        if len(images) != len(masks) or not images:
            raise ValueError(f"set_support: {len(images)} images but {len(masks)} masks")
        if len(images) > limit:
            raise ValueError(
                f"set_support: {len(images)} supports, more than the source allows "
                f"(sources.{limited_by}.max_supports={limit}): give at most {limit}, or "
                "raise max_supports"
            )
        xs, ms = [], []
        s = self.model.image_size
        for k, (img, m) in enumerate(zip(images, masks, strict=True)):
            img, m = check_image(img, f"set_support: support {k}"), np.asarray(m)
            if m.ndim != 2 or img.shape[:2] != m.shape:
                raise ValueError(
                    f"support {k}: image {img.shape[:2]} and mask {m.shape} differ in size: "
                    "give each mask at its image's size"
                )
            m = m > 0
            if not m.any() or m.all():
                what = "empty" if not m.any() else "all foreground"
                raise ValueError(
                    f"support {k}: the mask is {what}; a support needs foreground and "
                    "background pixels: give a mask of the object on its image"
                )
            xs.append(to_model_input(normalize_intensity(img, modality=modality, window=window), s))
            ms.append(resize_mask(np.ascontiguousarray(m), s))
        self.model.eval()
        dev = self.device
        self._support = self.model.encode_support(torch.stack(xs).to(dev), torch.stack(ms).to(dev))
        self.encoder_calls += 1

    def clear_support(self) -> None:
        self._support = None

    def _to_model_coords(self, xy: np.ndarray) -> np.ndarray:
        h, w = self._orig_hw
        s = self.image_size
        return xy * np.array([s / w, s / h], dtype=np.float32)

    def _mask_input(self, mask_input) -> np.ndarray | None:
        """mask_input as (1, 1, S/4, S/4) float32 logits (None when not given), checked."""
        if not is_given(mask_input):
            return None
        mi = np.asarray(mask_input, dtype=np.float32)
        if not np.isfinite(mi).all():
            raise ValueError(
                "mask_input holds NaN or infinite logits: pass low_res_logits of an earlier "
                "predict() call"
            )
        low = self.image_size // 4
        if mi.shape[-2:] != (low, low) or mi.size != low * low:
            raise ValueError(f"mask_input must be (1, {low}, {low}) logits, got {tuple(mi.shape)}")
        return mi.reshape(1, 1, low, low)

    @torch.no_grad()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the prompts on the current image.

        Args:
            point_coords: (N, 2) x, y in original-image pixels; point_labels: (N,) 1 fg / 0 bg,
                default all 1 (foreground).
            box: (4,) x0, y0, x1, y1 in original-image pixels (corners in any order: sorted), or
                (K, 4) for K objects at once.
            mask_input: (1, S/4, S/4) logits, e.g. `low_res_logits` of an earlier call.
            multimask_output: three candidate masks (ambiguous prompts) instead of one.
            return_logits: return float logits instead of boolean masks.

        An empty list / array is the same as None; the rules are `check_prompt`'s
        (`samed2_kit.prompts`): finite coordinates inside the image, labels 1 or 0.

        Returns:
            masks (C, H, W) (or (K, C, H, W) for K boxes), scores (C,) predicted IoU,
            low_res_logits (C, S/4, S/4); C = 3 with multimask_output, else 1.
        """
        if self._features is None:
            raise RuntimeError("call set_image(image) before predict(...)")
        p = Prompt()
        if any(is_given(v) for v in (point_coords, point_labels, box)):
            given = Prompt(box=box, points=point_coords, labels=point_labels)
            p = check_prompt(given, self._orig_hw, names=PREDICT_NAMES, many_boxes=True)
        if (
            p.points is None
            and p.box is None
            and not is_given(mask_input)
            and self._support is None
        ):
            raise ValueError(
                "predict needs at least one prompt: point_coords (+ point_labels), box or "
                "mask_input (or set_support(...) first, for few-shot prediction without a prompt)"
            )
        mask = self._mask_input(mask_input)
        batched = p.box is not None and np.ndim(box) == 2
        boxes = (
            None if p.box is None else self._to_model_coords(p.box.reshape(-1, 2)).reshape(-1, 4)
        )
        points = None if p.points is None else self._to_model_coords(p.points)
        self.suggested_clicks = None
        if self.onnx is not None:
            low_res, iou = self._decode_onnx(points, p.labels, boxes, mask, multimask_output)
        else:
            low_res, iou = self._decode_torch(points, p.labels, boxes, mask, multimask_output)
        full = F.interpolate(low_res, size=self._orig_hw, mode="bilinear", align_corners=False)
        result = full if return_logits else full > self.mask_threshold
        low_res = torch.clamp(low_res, -32.0, 32.0)
        result, scores, low_res = (t.cpu().numpy() for t in (result, iou, low_res))
        if not batched:
            return result[0], scores[0], low_res[0]
        return result, scores, low_res

    def _decode_torch(self, points, labels, boxes, mask, multimask_output: bool):
        """The torch model on K objects (K boxes, else 1), prompts in model-input pixels:
        low-res logits (K, M, S/4, S/4) and IoU (K, M), float32."""
        dev = self.device
        k = len(boxes) if boxes is not None else 1
        if boxes is not None:
            boxes = torch.from_numpy(boxes).to(dev)
        if points is not None:
            points = torch.from_numpy(points)[None].expand(k, -1, -1).to(dev)
            labels = torch.from_numpy(labels)[None].expand(k, -1).to(dev)
        else:
            labels = None
        masks = None if mask is None else torch.from_numpy(mask).expand(k, -1, -1, -1).to(dev)
        feats = self._features.select(torch.zeros(k, dtype=torch.long, device=dev))
        prompts = Prompts(points, labels, boxes, masks)
        out = self.model.decode(feats, prompts, multimask_output, support=self._support)
        if out.prompts is not prompts:  # few-shot: the source's clicks, in image pixels
            h, w = self._orig_hw
            xy = out.prompts.points[0].float().cpu().numpy() / self.model.image_size * [w, h]
            lab = out.prompts.point_labels[0].cpu().numpy()
            self.suggested_clicks = (xy[lab >= 0], lab[lab >= 0])
        return out.low_res_logits.float(), out.iou.float()

    def _decode_onnx(self, points, labels, boxes, mask, multimask_output: bool):
        """`_decode_torch` through the export's decoder graph, one object per call."""
        lows, ious = [], []
        for box in boxes if boxes is not None else [None]:
            low, iou, _ = self.onnx.predict_low_res(self._features, points, labels, box, mask,
                                                    multimask_output)  # fmt: skip
            lows.append(low)
            ious.append(iou)
        return torch.from_numpy(np.stack(lows)), torch.from_numpy(np.stack(ious))


def max_supports(model) -> tuple[float, str | None]:
    """The most supports every support-reading source of `model` accepts, and which sets it."""
    from samed2_kit.registry import source_kind

    limits = []
    for name, module in model.support_sources().items():
        kind = source_kind(model.source_kinds[name])
        if kind.max_supports is not None:
            limits.append((kind.max_supports(module), name))
    return min(limits) if limits else (float("inf"), None)


def _auto_backend(model) -> tuple[object, str]:
    """(model, backend) for backend="auto": an export folder or OnnxModel runs on onnx, a run
    folder is loaded and runs on torch, a SAMed2Model on torch."""
    if isinstance(model, (str, Path)):
        from samed2_kit.deploy.contract import is_export_dir

        if is_export_dir(model):
            return model, "onnx"
        from samed2_kit.model.assemble import load

        return load(model).eval(), "torch"
    if type(model).__name__ == "OnnxModel":
        return model, "onnx"
    return model, "torch"


def _onnx_model(model):
    """(OnnxModel, the temporary folder to remove with the predictor, or None) for
    backend="onnx": from an OnnxModel, an export folder, or a model (exported first)."""
    from samed2_kit.deploy.runtime import OnnxModel

    if isinstance(model, OnnxModel):
        return model, None
    if isinstance(model, (str, Path)):
        return OnnxModel(model), None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"Predictor(backend='onnx') takes an export folder (`samed2 export RUN --out DIR`), "
            f"an OnnxModel or a SAMed2Model, got {type(model).__name__}"
        )
    import shutil
    import tempfile

    from samed2_kit.deploy.contract import require
    from samed2_kit.deploy.export import export_onnx

    require("onnxruntime")  # before the export, not after it
    tmp = Path(tempfile.mkdtemp(prefix="samed2-onnx-"))
    try:
        return OnnxModel(export_onnx(model, tmp / "export", propagation=False)), tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
