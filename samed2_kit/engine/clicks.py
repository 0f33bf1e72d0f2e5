"""Simulated corrective clicks while training, as SAM 2's trainer samples them.

    rounds = correct(decode, first, prompts, gt, seeds, cfg)   # list of Round

After the first prediction of a batch, each sample is corrected with probability `cfg.prob`,
drawn from the sample's own seed (`batch["seed"]`, from the data's seed, epoch and index), so the
choice and the clicks depend neither on the batch it is in nor on the number of processes, and a
resumed run repeats them. A corrected sample gets `cfg.rounds` more decoder passes on the same
image features. Before each pass one click is drawn uniformly from the pixels where the current
mask (its logits upsampled to the ground truth's S x S, > 0) disagrees with the ground truth:
positive on a false negative, negative on a false positive; an image without errors gets a click
anywhere, labelled by the ground truth. With a field of view (the batch's `valid`), errors and
clicks are taken inside it only (an image with an empty FOV falls back to every pixel). A pass takes the sample's first prompt, all its clicks so
far and the previous pass's logits (detached) as the mask input. The loss is computed on every
pass and summed (`round_loss`), as SAM 2 does over its correction steps.

Clips of T slices: the clip's seed decides for all its T images; each image draws its own clicks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from samed2_kit.types import Prompts

SELECT_STREAM, CLICK_STREAM = 0xC1, 0xC2  # separate random streams per seed


@dataclass
class Round:
    """One corrective pass over rows `index` (k,) of the batch: logits (k, 1, S/4, S/4),
    iou (k, 1), object_score_logits (k, 1), tokens (k, 1, C)."""

    index: torch.Tensor
    low_res_logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    tokens: torch.Tensor | None = None  # the decoder's output tokens, when decode gives them


def chosen_mask(logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """(B, 1, s, s): per image, the mask of the highest predicted IoU among its M (B, M, s, s)."""
    if logits.shape[1] == 1:
        return logits
    best = iou.argmax(dim=1)
    return logits[torch.arange(len(logits), device=logits.device), best][:, None]


def selected_rows(seeds: list[int], prob: float, per_seed: int) -> list[int]:
    """Rows (of per_seed rows per seed, seed-major) whose seed draws a correction."""
    rows = []
    for s, seed in enumerate(seeds):
        if np.random.default_rng([int(seed), SELECT_STREAM]).random() < prob:
            rows += range(s * per_seed, (s + 1) * per_seed)
    return rows


def error_clicks(
    logits: torch.Tensor, gt: torch.Tensor, rngs: list, valid: torch.Tensor | None = None
) -> tuple:
    """One click per image: points (k, 1, 2) xy in gt pixels, labels (k, 1) int64.
    logits (k, 1, s, s); gt (k, 1, S, S) in {0, 1}; rngs: one numpy Generator per image;
    valid: (k, 1, S, S) field of view (> 0.5 inside): errors and clicks inside it only (every
    pixel where an image's FOV is empty); None: every pixel."""
    up = F.interpolate(logits.detach().float(), size=gt.shape[-2:], mode="bilinear",
                       align_corners=False)  # fmt: skip
    pred, truth = (up[:, 0] > 0).cpu().numpy(), (gt[:, 0] > 0.5).cpu().numpy()
    inside = [None] * len(pred) if valid is None else (valid[:, 0] > 0.5).cpu().numpy()
    points = np.zeros((len(pred), 1, 2), np.float32)
    labels = np.zeros((len(pred), 1), np.int64)
    for i, (p, t, v, rng) in enumerate(zip(pred, truth, inside, rngs, strict=True)):
        if v is None or not v.any():
            wrong = np.flatnonzero(p != t)
            pool = wrong if wrong.size else np.arange(t.size)
        else:
            wrong = np.flatnonzero((p != t) & v)
            pool = wrong if wrong.size else np.flatnonzero(v)
        k = int(pool[rng.integers(pool.size)])
        y, x = divmod(k, t.shape[1])
        points[i, 0], labels[i, 0] = (x, y), int(t[y, x])
    dev = logits.device
    return torch.from_numpy(points).to(dev), torch.from_numpy(labels).to(dev)


def _rows(prompts: Prompts, index: torch.Tensor) -> Prompts:
    def pick(x):
        return None if x is None else x[index]

    return Prompts(pick(prompts.points), pick(prompts.point_labels), pick(prompts.boxes))


def correct(decode: Callable, first: torch.Tensor, prompts: Prompts, gt: torch.Tensor,
            seeds: list[int], cfg, per_seed: int = 1,
            valid: torch.Tensor | None = None) -> list[Round]:  # fmt: skip
    """Corrective rounds after a first prediction (see the module docstring).

    decode(index (k,), Prompts) -> (logits (k, 1, s, s), iou (k, 1), object_score (k, 1)[,
    output tokens (k, 1, C)]): the decoder on rows `index` of the batch. first: (B, 1, s, s)
    the first prediction's logits; prompts: the batch's first prompts; gt: (B, 1, S, S); seeds:
    one per `per_seed` rows; valid: (B, 1, S, S) field of view, clicks inside it (None: all)."""
    if cfg.prob <= 0:
        return []
    rows = selected_rows(seeds, cfg.prob, per_seed)
    if not rows:
        return []
    index = torch.tensor(rows, device=first.device)
    base, target, prev = _rows(prompts, index), gt[index], first[index].detach()
    inside = None if valid is None else valid[index]
    points = base.points if base.points is not None else first.new_zeros((len(rows), 0, 2))
    labels = base.point_labels
    labels = labels if labels is not None else torch.zeros((len(rows), 0), dtype=torch.int64,
                                                           device=first.device)  # fmt: skip
    out = []
    for r in range(cfg.rounds):
        rngs = [np.random.default_rng([int(seeds[i // per_seed]), CLICK_STREAM, i % per_seed, r])
                for i in rows]  # fmt: skip
        p, lab = error_clicks(prev, target, rngs, inside)
        points, labels = torch.cat([points, p.to(points.dtype)], 1), torch.cat([labels, lab], 1)
        logits, iou, obj, *tokens = decode(index, Prompts(points, labels, base.boxes, prev))
        out.append(Round(index, logits, iou, obj, *tokens))
        prev = logits.detach()
    return out


def round_loss(loss_fn, first, rounds: list[Round], gt: torch.Tensor,
               valid: torch.Tensor | None = None):  # fmt: skip
    """The loss over the first prediction and every corrective round: the first pass's loss
    (`first`, a mean over the batch's B rows) plus each round's loss on its k rows times k / B,
    i.e. a sum over every (row, pass) divided by B, as sam2 sums its correction steps' losses.
    Each sample's share depends only on its own draws, so a batch split over processes gives
    the same loss. `valid` (B, 1, S, S): the batch's field of view, given to `loss_fn` (None:
    not passed). Returns one LossOutput (parts: the first pass's, and `clicks` for the rest)."""
    if not rounds:
        return first
    b = len(first.best_mask)
    extra = 0.0
    for r in rounds:
        kw = {} if valid is None else {"valid": valid[r.index]}
        loss = loss_fn(r.low_res_logits, r.iou, r.object_score_logits, gt[r.index], {}, **kw)
        extra = extra + loss.total * (len(r.index) / b)
    parts = {**first.parts, "clicks": float(extra.detach())}
    return type(first)(first.total + extra, parts, first.best_mask)
