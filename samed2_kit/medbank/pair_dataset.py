"""torch Dataset over image/mask pairs (``PairRecord`` from :mod:`samed2_kit.medbank.pairs`).

Kept apart from ``pairs.py``, which finds the pairs without importing torch; this module depends
on it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from samed2_kit.medbank.io.image import read_image, read_mask
from samed2_kit.medbank.pairs import PairRecord
from samed2_kit.medbank.preprocess import normalize_intensity, resize_mask, to_model_input
from samed2_kit.prompts import Prompt, PromptConfig, sample_prompt, scale_prompt


def augment_clip(
    images01: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    rng: np.random.Generator,
    ref: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One seeded augmentation applied identically to T images (H, W, 3) float [0, 1] and T masks
    (H, W) bool of one size (the slices of a clip): the ``augment_pair`` transforms, drawn once.
    The affine is kept only if it leaves at least half of ``masks[ref]`` (default: the middle,
    T // 2) in the image; otherwise every slice keeps its un-transformed geometry."""
    import cv2

    images01, masks = list(images01), list(masks)
    ref = len(masks) // 2 if ref is None else ref
    if rng.random() < 0.5:
        images01, masks = [x[:, ::-1] for x in images01], [m[:, ::-1] for m in masks]
    if rng.random() < 0.8:
        h, w = masks[ref].shape
        m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-20, 20), rng.uniform(0.85, 1.15))
        m[:, 2] += rng.uniform(-0.05, 0.05, 2) * (w, h)

        def warp(x, flags):
            return cv2.warpAffine(np.ascontiguousarray(x), m, (w, h), flags=flags)

        warped = [warp(k.astype(np.uint8), cv2.INTER_NEAREST) > 0 for k in masks]
        if warped[ref].sum() >= 0.5 * masks[ref].sum() > 0:
            images01, masks = [warp(x, cv2.INTER_LINEAR) for x in images01], warped
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.05, 0.05)
    return [np.clip(x * scale + shift, 0, 1) for x in images01], masks


def augment_pair(img01: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Seeded augmentation of an image (H, W, 3) float [0, 1] and its mask (H, W) bool, together:
    horizontal flip (p=0.5); a small affine (rotation +-20 deg, scale 0.85-1.15, shift +-5% of the
    size; p=0.8; bilinear image, nearest mask, zero fill); intensity scale 0.9-1.1, shift +-0.05.
    A mask that the affine would push out of the image keeps the un-transformed pair.
    (``augment_clip`` with one slice; it applies the same draw to several slices.)"""
    images, masks = augment_clip([img01], [mask], rng)
    return images[0], masks[0]


class PairDataset(torch.utils.data.Dataset):
    """Samples of image/mask pairs at ``image_size`` with seeded prompts, as dicts (see ``collate``).

    Item keys: ``image`` (3, S, S) float32 ImageNet-normalised; ``mask`` (1, S, S) float32 {0, 1};
    ``box`` (4,) float32 xyxy in S-space (zeros when unused) with ``has_box``; ``points`` (N, 2)
    float32 S-space xy and ``point_labels`` (N,) int64; ``orig_hw`` (H, W); ``spacing`` (mm,
    row/col); ``case_id``, ``sample_id``, ``task``, ``label``, ``modality``. Prompts come from
    ``np.random.default_rng([seed, epoch, i])``: call ``set_epoch`` every epoch for new prompts
    (with DataLoader workers, not persistent ones). Empty masks are dropped at construction when
    ``drop_empty`` (``self.dropped`` lists them); otherwise they get a full-image box and no
    points. ``augment``: seeded flip, small affine and intensity changes (``augment_pair``), on
    image and mask together, before prompt sampling. ``cache``: keep decoded files in
    memory (for small sets; each DataLoader worker holds its own copy).
    """

    def __init__(
        self,
        records: Sequence[PairRecord],
        image_size: int = 256,
        prompt: PromptConfig | None = None,
        seed: int = 0,
        augment: bool = False,
        drop_empty: bool = True,
        cache: bool = False,
    ) -> None:
        self.image_size, self.prompt = int(image_size), prompt or PromptConfig()
        self.seed, self.augment, self.epoch = int(seed), augment, 0
        self._cache: dict[str, np.ndarray] | None = {} if cache else None
        records = list(records)
        empty = [not read_mask(r.mask_path).any() for r in records] if drop_empty else []
        self.dropped = [r for r, e in zip(records, empty, strict=False) if e]
        self.records = (
            [r for r, e in zip(records, empty, strict=False) if not e] if drop_empty else records
        )

    def _read(self, path: str, reader) -> np.ndarray:
        """Decode a file, or take it from the in-memory cache (``cache=True``: small sets)."""
        if self._cache is None:
            return reader(path)
        if path not in self._cache:
            self._cache[path] = reader(path)
        return self._cache[path]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        i = range(len(self.records))[i]
        rec, size = self.records[i], self.image_size
        image, mask = self._read(rec.image_path, read_image), self._read(rec.mask_path, read_mask)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"mask {rec.mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW), image "
                f"{rec.image_path} is {image.shape[0]}x{image.shape[1]}: a pair must have one size; "
                "fix the files (resize the mask with nearest-neighbour) or drop the pair"
            )
        img01 = normalize_intensity(image, rec.intensity, window=rec.window)
        if self.augment:
            img01, mask = augment_pair(
                img01, mask, np.random.default_rng([self.seed, self.epoch, i, 1])
            )
        h, w = mask.shape
        rng = np.random.default_rng([self.seed, self.epoch, i])
        full = Prompt(box=np.array([0, 0, w - 1, h - 1], np.float32))
        p = scale_prompt(
            sample_prompt(mask, self.prompt, rng) if mask.any() else full, (h, w), size
        )
        points = p.points if p.points is not None else np.zeros((0, 2), np.float32)
        return {
            "image": to_model_input(np.ascontiguousarray(img01, np.float32), size),
            "mask": resize_mask(np.ascontiguousarray(mask), size),
            "box": torch.from_numpy(p.box if p.box is not None else np.zeros(4, np.float32)),
            "has_box": p.box is not None,
            "points": torch.from_numpy(points),
            "point_labels": torch.from_numpy(
                p.labels if p.labels is not None else np.zeros(0, np.int64)
            ),
            "orig_hw": (h, w), "spacing": tuple(rec.spacing), "case_id": rec.case_id,
            "sample_id": rec.sample_id, "task": rec.task, "label": rec.label,
            "modality": rec.modality,
        }  # fmt: skip


def collate(batch: Sequence[dict]) -> dict:
    """Batch :class:`PairDataset` items: tensors stacked; points padded to the largest N with
    (0, 0) and label -1 (SAM's padding); ``has_box`` (B,) bool, ``orig_hw`` (B, 2) int64,
    ``spacing`` (B, 2) float64; strings as lists."""
    n = max(len(b["points"]) for b in batch)
    points = torch.zeros(len(batch), n, 2)
    labels = torch.full((len(batch), n), -1, dtype=torch.int64)
    for k, b in enumerate(batch):
        points[k, : len(b["points"])], labels[k, : len(b["points"])] = (
            b["points"],
            b["point_labels"],
        )
    out = {key: torch.stack([b[key] for b in batch]) for key in ("image", "mask", "box")}
    out.update(points=points, point_labels=labels)
    out["has_box"] = torch.tensor([b["has_box"] for b in batch], dtype=torch.bool)
    out["orig_hw"] = torch.tensor([b["orig_hw"] for b in batch], dtype=torch.int64)
    out["spacing"] = torch.tensor([b["spacing"] for b in batch], dtype=torch.float64)
    for key in ("case_id", "sample_id", "task", "label", "modality"):
        out[key] = [b[key] for b in batch]
    return out
