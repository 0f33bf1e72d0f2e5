"""Training loss for SAM 2 mask decoder outputs (MONAI Dice+CE / focal, IoU and object-score heads).

Follows SAM 2's training rule for multimask outputs: the segmentation loss is computed for every
candidate mask, and only the best (minimum-loss) mask per sample is back-propagated; the IoU head
is supervised for all candidates with the real IoU of each thresholded mask.

Field of view: given ``valid`` (B, 1, H, W), 1 inside the image's field of view (`medbank`'s
``fov`` column), every segmentation term, the IoU target and the object-presence target see only
the pixels inside it; without it (None) every pixel counts, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samed2_kit.config import LossConfig

__all__ = ["LossConfig", "LossOutput", "SegLoss", "boundary_loss", "real_iou"]


@dataclass
class LossOutput:
    """Result of :class:`SegLoss`.

    Attributes:
        total: scalar float32 loss, differentiable.
        parts: detached unweighted value of each active term (``dice_ce``, ``focal``, ``iou``,
            ``object_score``); terms with weight 0 are absent.
        best_mask: (B,) long index of the mask chosen per sample.
    """

    total: torch.Tensor
    parts: dict[str, float]
    best_mask: torch.Tensor


def _resize_to(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, M, h, w) logits -> (B, M, H, W), bilinear, align_corners=False (no-op if same size)."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def real_iou(
    mask_logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Real IoU of each thresholded mask against the ground truth (no gradient).

    Args:
        mask_logits: (B, M, h, w) logits; resized bilinearly to gt's (H, W) if needed.
        gt: (B, 1, H, W) binary mask (> 0.5 = foreground).
        valid: (B, 1, H, W) field of view (> 0.5 = inside); pixels outside it count neither in
            the intersection nor in the union. None: every pixel.

    Returns:
        (B, M) float32 IoU of ``(logits > 0)`` vs gt; 1.0 where both are empty.
    """
    logits = _resize_to(mask_logits.detach().float(), tuple(gt.shape[-2:]))
    pred = logits > 0
    target = (gt.detach().float() > 0.5).expand_as(pred)
    if valid is not None:
        inside = (valid.detach().float() > 0.5).expand_as(pred)
        pred, target = pred & inside, target & inside
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def boundary_loss(
    logits: torch.Tensor,
    gt: torch.Tensor,
    theta0: int = 3,
    theta: int = 5,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """BF1 boundary loss (Bokhovkin & Burnaev 2019; CoW's L_bound), per sample: (B,).

    logits, gt: (B, 1, H, W). Boundaries are 1 - x's max-pool (theta0 x theta0) minus (1 - x), on
    sigmoid probabilities and the target; each is widened by a theta x theta max-pool to measure
    precision P (predicted boundary near the true one) and recall R; loss = 1 - 2PR / (P + R).
    The foreground boundary only (the background's is the same curve for a binary mask).
    valid: (B, 1, H, W) field of view: probabilities and target are zeroed outside it and only
    boundary pixels inside it count. None: every pixel.
    """
    p, y = torch.sigmoid(logits.float()), gt.float()
    if valid is not None:
        inside = (valid.float() > 0.5).float()
        p, y = p * inside, y * inside

    def edge(x: torch.Tensor) -> torch.Tensor:
        inv = 1.0 - x
        return F.max_pool2d(inv, theta0, stride=1, padding=theta0 // 2) - inv

    pb, yb = edge(p), edge(y)
    if valid is not None:
        pb, yb = pb * inside, yb * inside
    pb_ext = F.max_pool2d(pb, theta, stride=1, padding=theta // 2)
    yb_ext = F.max_pool2d(yb, theta, stride=1, padding=theta // 2)
    eps = 1e-7
    precision = (pb * yb_ext).flatten(1).sum(1) / (pb.flatten(1).sum(1) + eps)
    recall = (pb_ext * yb).flatten(1).sum(1) / (yb.flatten(1).sum(1) + eps)
    return 1.0 - 2 * precision * recall / (precision + recall + eps)


def _check_inputs(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    obj: torch.Tensor,
    gt: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    if mask_logits.ndim != 4:
        raise ValueError(
            f"mask_logits must be (B, M, h, w) logits, got shape {tuple(mask_logits.shape)}."
        )
    b, m = mask_logits.shape[:2]
    if gt.ndim != 4 or gt.shape[0] != b or gt.shape[1] != 1:
        raise ValueError(
            f"gt must be (B, 1, H, W) with B={b} (from mask_logits), got shape {tuple(gt.shape)}; "
            "add the channel axis with gt[:, None]."
        )
    if tuple(iou_pred.shape) != (b, m):
        raise ValueError(
            f"iou_pred must be (B, M) = ({b}, {m}), got shape {tuple(iou_pred.shape)}."
        )
    if tuple(obj.shape) != (b, 1):
        raise ValueError(
            f"object_score_logits must be (B, 1) = ({b}, 1), got shape {tuple(obj.shape)}."
        )
    if valid is not None and tuple(valid.shape) != tuple(gt.shape):
        raise ValueError(
            f"valid (the field of view) must have gt's shape {tuple(gt.shape)} (B, 1, H, W), got "
            f"{tuple(valid.shape)}; resize it with the mask (`medbank.dataset` does)."
        )


def _inside_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, M, H, W) per-pixel values -> (B, M) means over the pixels where ``valid`` (B, 1, H, W)
    is 1; 0 for an image without any valid pixel."""
    total = (per_pixel * valid).flatten(2).sum(-1)
    return total / valid.flatten(2).sum(-1).clamp(min=1.0)


class SegLoss(torch.nn.Module):
    """Weighted sum of segmentation, IoU-regression and object-score losses (see :class:`LossConfig`).

    Segmentation terms (dice_ce, focal) are computed per (sample, mask); the mask with the minimum
    weighted segmentation loss is picked per sample and only it is used. They are summed over
    samples whose gt is non-empty and divided by the number of samples B (sam2's normalisation by
    its number of objects), so that a batch split over processes gives the same loss as one
    process; a batch without any object gets 0. The IoU term covers all samples and all M masks;
    the object-score term covers all samples. Everything runs in float32 with autocast disabled.

    With a field of view ``valid`` (B, 1, H, W), the gt is zeroed outside it (an object is
    present when it has a pixel inside), soft Dice takes sigmoid and target inside it only
    (MONAI's formula and smoothing), BCE and focal are means over its pixels, the IoU target is
    ``real_iou`` inside it: logits outside the FOV get no gradient and change nothing.
    """

    def __init__(self, cfg: LossConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else LossConfig()
        from monai.losses import DiceLoss, FocalLoss

        # reduction="none" versions of DiceCELoss's parts, so the loss can be picked per mask.
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.focal_loss = FocalLoss(gamma=2.0, alpha=0.25, reduction="none")

    def _seg_terms(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """(B, M, H, W) logits and targets [, (B, 1, H, W) field of view {0, 1}] -> {term: (B, M)
        unweighted loss}."""
        terms: dict[str, torch.Tensor] = {}
        if self.cfg.dice_ce > 0:
            terms["dice_ce"] = self._dice_ce(logits, target, valid)
        if self.cfg.focal > 0:
            focal = self.focal_loss(logits, target)
            terms["focal"] = (
                focal.flatten(2).mean(-1) if valid is None else _inside_mean(focal, valid)
            )
        return terms

    def _dice_ce(
        self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, M, H, W) logits and targets -> (B, M) soft Dice + pixel-mean BCE; with a field of
        view ``valid`` (B, 1, H, W) {0, 1}, both over the pixels inside it only."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if valid is None:
            dice = self.dice(logits, target).flatten(1)
            return dice + bce.flatten(2).mean(-1)
        # MONAI's DiceLoss formula (sigmoid, per (sample, mask), its smoothing) inside the FOV
        p, t = torch.sigmoid(logits) * valid, target * valid
        inter = (p * t).flatten(2).sum(-1)
        denom = p.flatten(2).sum(-1) + t.flatten(2).sum(-1)
        dice = 1.0 - (2.0 * inter + self.dice.smooth_nr) / (denom + self.dice.smooth_dr)
        return dice + _inside_mean(bce, valid)

    def forward(
        self,
        mask_logits: torch.Tensor,
        iou_pred: torch.Tensor,
        object_score_logits: torch.Tensor,
        gt: torch.Tensor,
        source_logits: dict[str, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> LossOutput:
        """Compute the loss.

        Args:
            mask_logits: (B, M, h, w) mask logits, M = 1 or 3 masks per prompt.
            iou_pred: (B, M) predicted IoU in [0, 1] (already sigmoid-ed by SAM 2).
            object_score_logits: (B, 1) object-presence logits.
            gt: (B, 1, H, W) float ground truth in {0, 1}; logits are upsampled to (H, W).
            source_logits: {name: (B, 1, h, w)} prompt sources' own predictions (`source`
                term, reported as `source/<name>`).
            valid: (B, 1, H, W) field of view, > 0.5 inside (the batch's ``valid``): pixels
                outside it are ignored by every term (see the class docstring). None: every
                pixel counts (results exactly as without the argument).

        Returns:
            :class:`LossOutput`.
        """
        _check_inputs(mask_logits, iou_pred, object_score_logits, gt, valid)
        cfg = self.cfg
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            logits = _resize_to(mask_logits.float(), tuple(gt.shape[-2:]))
            target = (gt.float() > 0.5).float()
            inside = None if valid is None else (valid.float() > 0.5).float()
            if inside is not None:
                target = target * inside
            b, m = logits.shape[:2]
            present = target.flatten(1).amax(-1)  # (B,) 1.0 where gt is non-empty
            # mask terms: a mean over all B rows, absent objects adding 0 (sam2 divides by its
            # number of objects too), so a batch split over processes gives the same loss
            n_rows = float(b)

            seg = self._seg_terms(logits, target.expand(b, m, -1, -1), inside)
            weights = {"dice_ce": cfg.dice_ce, "focal": cfg.focal}
            ious = real_iou(logits, target, inside)
            if seg:
                combo = sum(weights[k] * v for k, v in seg.items())
                best = combo.detach().argmin(dim=1)
            else:  # no segmentation term: report the mask that is actually best
                best = ious.argmax(dim=1)
            rows = torch.arange(b, device=logits.device)

            total = logits.new_zeros(())
            parts: dict[str, float] = {}
            for name, per_mask in seg.items():
                value = (per_mask[rows, best] * present).sum() / n_rows
                total = total + weights[name] * value
                parts[name] = float(value.detach())
            if cfg.iou > 0:
                value = F.mse_loss(iou_pred.float(), ious)
                total = total + cfg.iou * value
                parts["iou"] = float(value.detach())
            if cfg.object_score > 0:
                value = F.binary_cross_entropy_with_logits(
                    object_score_logits.float(), present[:, None]
                )
                total = total + cfg.object_score * value
                parts["object_score"] = float(value.detach())
            if cfg.boundary > 0:
                chosen = logits[rows, best][:, None]
                per = boundary_loss(chosen, target, valid=inside)
                value = (per * present).sum() / n_rows
                total = total + cfg.boundary * value
                parts["boundary"] = float(value.detach())
            for name, src in (source_logits or {}).items() if cfg.source > 0 else ():
                src = _resize_to(src.float(), tuple(target.shape[-2:]))
                per = self._dice_ce(src, target, inside)[:, 0]
                value = (per * present).sum() / n_rows
                total = total + cfg.source * value
                parts[f"source/{name}"] = float(value.detach())
        return LossOutput(total=total, parts=parts, best_mask=best.long())
