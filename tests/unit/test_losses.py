"""Hand-checked tests of samed2_kit.losses.SegLoss and real_iou."""

import pytest
import torch

from samed2_kit.losses import LossConfig, SegLoss, real_iou

SEG_ONLY = LossConfig(dice_ce=1.0, focal=0.0, iou=0.0, object_score=0.0)


def _gt_left_half(b: int = 1, size: int = 8) -> torch.Tensor:
    """(B, 1, size, size) gt with the left half (columns 0..size/2-1) foreground."""
    gt = torch.zeros(b, 1, size, size)
    gt[..., : size // 2] = 1.0
    return gt


def _logits_from(mask: torch.Tensor) -> torch.Tensor:
    """{0, 1} mask -> +20 inside / -20 outside logits."""
    return mask * 40.0 - 20.0


def _heads(b: int, m: int = 1):
    return torch.full((b, m), 0.5), torch.zeros(b, 1)


def test_perfect_logits_beat_inverted():
    gt = _gt_left_half(2)
    loss = SegLoss(SEG_ONLY)
    good = loss(_logits_from(gt), *_heads(2), gt)
    bad = loss(_logits_from(1 - gt), *_heads(2), gt)
    assert good.total.item() < 0.01
    assert bad.total.item() > 1.0
    assert good.total.ndim == 0 and good.total.dtype == torch.float32


def test_matches_monai_dicece_and_focal_for_single_mask():
    from monai.losses import DiceCELoss, FocalLoss

    torch.manual_seed(0)
    gt = _gt_left_half(3)
    x = torch.randn(3, 1, 8, 8)
    out = SegLoss(LossConfig(dice_ce=1.0, focal=1.0, iou=0.0, object_score=0.0))(x, *_heads(3), gt)
    assert out.parts["dice_ce"] == pytest.approx(DiceCELoss(sigmoid=True)(x, gt).item(), rel=1e-5)
    ref_focal = FocalLoss(gamma=2.0, alpha=0.25)(x, gt).item()
    assert out.parts["focal"] == pytest.approx(ref_focal, rel=1e-5)


def test_multimask_picks_min_loss_mask():
    gt = _gt_left_half(2)
    torch.manual_seed(1)
    noise = torch.randn(2, 1, 8, 8)
    perfect, inverted = _logits_from(gt), _logits_from(1 - gt)
    logits = torch.cat([inverted, noise, perfect], dim=1)  # sample 0: best is mask 2
    logits[1] = torch.stack([perfect[1, 0], noise[1, 0], inverted[1, 0]])  # sample 1: mask 0
    loss = SegLoss(SEG_ONLY)
    out = loss(logits, *_heads(2, 3), gt)
    assert out.best_mask.tolist() == [2, 0]
    assert out.best_mask.dtype == torch.long
    only_best = loss(perfect, *_heads(2), gt)  # segmentation loss is that of the chosen mask
    assert out.parts["dice_ce"] == pytest.approx(only_best.parts["dice_ce"], abs=1e-6)


def test_real_iou_hand_values():
    gt = _gt_left_half(1)  # columns 0..3
    shifted = torch.zeros(1, 1, 8, 8)
    shifted[..., 2:6] = 1.0  # columns 2..5: intersection 2 cols, union 6 cols -> 1/3
    logits = torch.cat([_logits_from(gt), _logits_from(shifted), _logits_from(0 * gt)], dim=1)
    iou = real_iou(logits, gt)
    assert iou.shape == (1, 3)
    assert iou[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    empty = torch.zeros(1, 1, 8, 8)
    assert real_iou(_logits_from(empty), empty).item() == 1.0  # empty vs empty


def test_iou_regression_targets_real_iou_for_all_masks():
    gt = _gt_left_half(1)
    shifted = torch.zeros(1, 1, 8, 8)
    shifted[..., 2:6] = 1.0
    logits = torch.cat([_logits_from(gt), _logits_from(shifted)], dim=1)  # real IoU [1, 1/3]
    loss = SegLoss(LossConfig(dice_ce=0.0, iou=1.0, object_score=0.0))
    exact = loss(logits, torch.tensor([[1.0, 1 / 3]]), torch.zeros(1, 1), gt)
    assert exact.parts["iou"] == pytest.approx(0.0, abs=1e-12)
    zeros = loss(logits, torch.zeros(1, 2), torch.zeros(1, 1), gt)
    assert zeros.parts["iou"] == pytest.approx((1.0 + 1 / 9) / 2)  # MSE over both masks


def test_object_score_and_empty_gt():
    gt = torch.zeros(2, 1, 8, 8)  # no object anywhere
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss = SegLoss(LossConfig(dice_ce=1.0, iou=0.0, object_score=1.0))
    absent = loss(logits, torch.zeros(2, 1), torch.full((2, 1), -20.0), gt)
    present = loss(logits, torch.zeros(2, 1), torch.full((2, 1), 20.0), gt)
    assert absent.parts["dice_ce"] == 0.0  # segmentation terms skip empty-gt samples
    assert absent.parts["object_score"] < 1e-6
    assert present.parts["object_score"] == pytest.approx(20.0, abs=1e-4)
    present.total.backward()  # still differentiable
    assert float(logits.grad.abs().sum()) == 0.0


def test_segmentation_terms_sum_nonempty_samples_over_the_batch_size():
    """An empty sample adds 0 to the mask terms but counts in the batch size (sam2's
    normalisation), so the mean over two half-batches equals the whole batch's loss."""
    gt = _gt_left_half(2)
    gt[1] = 0.0
    torch.manual_seed(2)
    x = torch.randn(2, 1, 8, 8)
    loss = SegLoss(SEG_ONLY)
    both = loss(x, *_heads(2), gt)
    first = loss(x[:1], *_heads(1), gt[:1])
    empty = loss(x[1:], *_heads(1), gt[1:])
    assert empty.parts["dice_ce"] == 0.0
    assert both.parts["dice_ce"] == pytest.approx(first.parts["dice_ce"] / 2, rel=1e-6)
    assert float(both.total) == pytest.approx((float(first.total) + float(empty.total)) / 2)


def test_gradients_flow():
    gt = _gt_left_half(2)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    obj = torch.zeros(2, 1, requires_grad=True)
    out = SegLoss(LossConfig(focal=1.0))(logits, iou_pred, obj, gt)
    out.total.backward()
    for t in (logits, iou_pred, obj):
        assert t.grad is not None and float(t.grad.abs().sum()) > 0


def test_lower_resolution_logits_are_upsampled():
    gt = _gt_left_half(1, size=16)  # columns 0..7 of 16
    low = _logits_from(_gt_left_half(1, size=8))  # columns 0..3 of 8
    # bilinear x2 (align_corners=False): col 7 -> +10, col 8 -> -10, so the mask matches exactly
    assert real_iou(low, gt).item() == 1.0
    out = SegLoss()(low, torch.ones(1, 1), torch.full((1, 1), 20.0), gt)
    assert out.total.item() < 0.05
    assert out.parts["iou"] == pytest.approx(0.0, abs=1e-12)


def test_zero_weights_skip_terms():
    gt = _gt_left_half(1)
    x = torch.randn(1, 1, 8, 8)
    out = SegLoss(LossConfig(dice_ce=0.0, focal=1.0, iou=0.0, object_score=1.0))(x, *_heads(1), gt)
    assert set(out.parts) == {"focal", "object_score"}
    assert set(SegLoss()(x, *_heads(1), gt).parts) == {"dice_ce", "iou", "object_score"}
    with pytest.raises(ValueError, match="focal"):
        LossConfig(focal=-1.0)
    with pytest.raises(ValueError, match="all weights"):
        LossConfig(dice_ce=0.0, focal=0.0, iou=0.0, object_score=0.0)


def test_bad_shapes_name_the_field():
    gt = _gt_left_half(1)
    x = torch.randn(1, 3, 8, 8)
    loss = SegLoss()
    with pytest.raises(ValueError, match="iou_pred"):
        loss(x, torch.zeros(1, 1), torch.zeros(1, 1), gt)
    with pytest.raises(ValueError, match="gt"):
        loss(x, torch.zeros(1, 3), torch.zeros(1, 1), gt[:, 0])
    with pytest.raises(ValueError, match="object_score_logits"):
        loss(x, torch.zeros(1, 3), torch.zeros(1), gt)


def test_bf16_autocast_cpu():
    torch.manual_seed(3)
    gt = _gt_left_half(2)
    x = torch.randn(2, 3, 8, 8).bfloat16().requires_grad_()
    iou_pred = torch.rand(2, 3).bfloat16().requires_grad_()
    obj = torch.zeros(2, 1, dtype=torch.bfloat16)
    loss = SegLoss(LossConfig(focal=1.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(x, iou_pred, obj, gt.bfloat16())
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    ref = loss(x.detach().float(), iou_pred.detach().float(), obj.float(), gt)
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-5)
    out.total.backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_boundary_loss_is_low_on_the_true_boundary_and_trains():
    from samed2_kit.losses import boundary_loss

    gt = torch.zeros(1, 1, 64, 64)
    gt[..., 20:44, 20:44] = 1
    exact = boundary_loss((gt - 0.5) * 40, gt)
    near = torch.zeros_like(gt)
    near[..., 21:45, 21:45] = 1  # one pixel off: inside the 5 px tolerance
    far = torch.zeros_like(gt)
    far[..., 2:14, 40:60] = 1
    assert exact.shape == (1,) and float(exact) < 0.05
    assert float(boundary_loss((near - 0.5) * 40, gt)) < 0.2
    assert float(boundary_loss((far - 0.5) * 40, gt)) > 0.9
    logits = torch.randn(gt.shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    boundary_loss(logits, gt).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_source_and_boundary_terms_are_reported_and_weighted():
    gt = _gt_left_half(2, 16)
    good, bad = _logits_from(gt), _logits_from(1 - gt)
    base = SegLoss(SEG_ONLY)(good, *_heads(2), gt)
    cfg = LossConfig(dice_ce=1.0, focal=0.0, iou=0.0, object_score=0.0, boundary=0.5, source=2.0)
    out = SegLoss(cfg)(good, *_heads(2), gt, source_logits={"proto": bad[..., ::2, ::2]})
    assert set(out.parts) == {"dice_ce", "boundary", "source/proto"}
    want = base.total + 0.5 * out.parts["boundary"] + 2.0 * out.parts["source/proto"]
    assert out.total.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.parts["source/proto"] > 1.0  # the inverted source map is penalised
    no_source = LossConfig(dice_ce=1.0, focal=0.0, iou=0.0, object_score=0.0, source=0.0)
    off = SegLoss(no_source)(good, *_heads(2), gt, source_logits={"proto": bad})
    assert "source/proto" not in off.parts  # weight 0: not computed
