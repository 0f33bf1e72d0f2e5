"""CoW hard prototypes as a prompt source: mining, k-means, fusion, clicks, errors, determinism."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from samed2_kit.model._sam2 import ImageFeatures
from samed2_kit.sources.base import PromptContribution, SourceContext, Support
from samed2_kit.sources.hard import (
    EDGE,
    GLOBAL,
    HARD,
    NORMAL,
    HardPrototypes,
    HardPrototypesConfig,
    kmeans,
)

C = 64  # the width of test-tiny's image embedding


def _e(*idx: int) -> torch.Tensor:
    v = torch.zeros(C)
    v[list(idx)] = 1.0
    return v / v.norm()


# feature "kinds": A the dominant fg, B a fg kind closer to the background, G background,
# FP a background kind closer to the foreground (planted false positives)
A, B, G, FP = _e(0), _e(1, 2), _e(2), _e(0, 3)
KINDS = torch.stack([A, B, G, FP])
KA, KB, KG, KFP = range(4)


def _feats(kinds: torch.Tensor, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """(C, h, w) features from a (h, w) map of kind ids, plus seeded noise."""
    x = KINDS[kinds].permute(2, 0, 1)
    g = torch.Generator().manual_seed(seed)
    return x + noise * torch.randn(x.shape, generator=g)


def _mask(cells: torch.Tensor) -> torch.Tensor:
    """(1, S, S) pixel mask, S = 16 h, from a (h, w) bool cell mask."""
    return cells.float().repeat_interleave(16, 0).repeat_interleave(16, 1)[None]


def _support_scene(h: int = 16, seed: int = 0):
    """Support: fg square of A with a B block in its corner, an FP block in the background.

    Returns features (C, h, w), mask (1, S, S), fg cells, the B block, the FP block (h, w) bool."""
    s = h // 16
    fg, block_b, block_fp = (torch.zeros(h, h, dtype=torch.bool) for _ in range(3))
    fg[2 * s : 12 * s, 2 * s : 12 * s] = True
    block_b[2 * s : 5 * s, 2 * s : 5 * s] = True
    block_fp[13 * s : 15 * s, 13 * s : 15 * s] = True
    kinds = torch.full((h, h), KG)
    kinds[fg] = KA
    kinds[block_b] = KB
    kinds[block_fp] = KFP
    return _feats(kinds, seed), _mask(fg), fg, block_b, block_fp


def _query_scene(h: int = 16, seed: int = 1):
    """Query: an A object (no B), an FP distractor, G elsewhere. Returns features, object, FP."""
    s = h // 16
    obj, distractor = torch.zeros(h, h, dtype=torch.bool), torch.zeros(h, h, dtype=torch.bool)
    obj[8 * s : 14 * s, 3 * s : 9 * s] = True
    distractor[2 * s : 5 * s, 11 * s : 14 * s] = True
    kinds = torch.full((h, h), KG)
    kinds[obj] = KA
    kinds[distractor] = KFP
    return _feats(kinds, seed), obj, distractor


def _ctx(support_x, support_m, h, query_index=None):
    return SourceContext(
        sam=None,
        image_size=16 * h,
        support=Support(features=_imf(support_x), masks=support_m, query_index=query_index),
    )


def _imf(x: torch.Tensor) -> ImageFeatures:
    return ImageFeatures(image_embed=x, high_res=[], pos=torch.zeros_like(x))


def _run(src, h=16, batch=2, **cfg):
    sx, sm, *_ = _support_scene(h)
    qx = torch.stack([_query_scene(h, seed=1 + b)[0] for b in range(batch)])
    return src(_imf(qx), None, _ctx(sx[None], sm[None], h))


# ------------------------------------------------------------------ k-means


def test_kmeans_matches_a_hand_checked_case():
    pts = torch.tensor([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0], [9.0, 1.0]])
    # nearest the mean (5.8, 1) is (9, 1) -> centre 0; farthest from it: (0, 0) (first of a tie)
    for iters in (0, 1, 5):
        centres, labels = kmeans(pts, 2, iters)
        assert torch.allclose(centres, torch.tensor([[29 / 3, 1.0], [0.0, 1.0]]))
        assert labels.tolist() == [1, 1, 0, 0, 0]


def test_kmeans_is_deterministic_handles_few_points_and_carries_gradient():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 16, generator=g)
    c1, l1 = kmeans(pts, 8, 10)
    torch.manual_seed(123)
    c2, l2 = kmeans(pts, 8, 10)
    assert torch.equal(c1, c2) and torch.equal(l1, l2) and c1.shape == (8, 16)
    for j in range(8):  # the centres are the means of their clusters
        assert torch.allclose(c1[j], pts[l1 == j].mean(0), atol=1e-6)
    c3, l3 = kmeans(pts, 8, 100)  # converged: every point is nearest its own centre
    assert torch.equal(torch.cdist(pts, c3).argmin(1), l3)
    few, labels = kmeans(pts[:3], 8, 10)  # fewer points than k: one centre per point
    assert torch.equal(few, pts[:3]) and labels.tolist() == [0, 1, 2]
    assert kmeans(pts[:0], 8, 10)[0].shape == (0, 16)
    same = torch.ones(5, 16)  # duplicates: empty clusters are dropped
    assert kmeans(same, 3, 10)[0].shape == (1, 16)
    leaf = pts.clone().requires_grad_()
    kmeans(leaf, 4, 3)[0].sum().backward()
    assert leaf.grad.abs().sum() > 0


# ------------------------------------------------------------------ mining


def test_hard_prototypes_come_from_the_self_prediction_errors():
    src = HardPrototypes(HardPrototypesConfig(), C)
    sx, sm, fg, block_b, block_fp = _support_scene()
    p = src.prototypes(sx[None], sm[None], image_size=256)
    assert torch.equal(p.hard_fg_cells[0], block_b)  # false negatives: the B block, exactly
    assert torch.equal(p.hard_bg_cells[0], block_fp)  # false positives: the planted FP block
    hard_fg, hard_bg = p.of("fg", HARD), p.of("bg", HARD)
    assert hard_fg.shape == (8, C)  # 9 cells, at most 8 prototypes
    assert (hard_fg @ B > 0.95).all()
    # 4 FP cells < 8: one prototype per cell, the cells' own (unit) features
    cells = torch.nn.functional.normalize(sx[:, block_fp].T, dim=1)
    assert hard_bg.shape == (4, C)
    assert torch.allclose(hard_bg, cells, atol=1e-6)
    assert p.of("fg", GLOBAL).shape == (1, C) and p.of("bg", GLOBAL).shape == (1, C)
    assert p.of("fg", NORMAL).shape == (4, C) and p.of("bg", NORMAL).shape == (4, C)
    assert torch.allclose(p.fg.norm(dim=1), torch.ones(len(p.fg)))


def test_edge_prototypes_of_a_disk():
    h = 16
    yy, xx = np.mgrid[:h, :h]
    disk = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 25
    inner = disk & ~ndimage.binary_erosion(disk, np.ones((3, 3)))
    outer = ndimage.binary_dilation(disk, np.ones((3, 3))) & ~disk
    kinds = np.full((h, h), 2)
    kinds[disk], kinds[inner], kinds[outer] = 0, 1, 3
    x = torch.stack([_e(0), _e(1), _e(2), _e(3)])[torch.from_numpy(kinds)].permute(2, 0, 1)
    src = HardPrototypes(HardPrototypesConfig(), C)
    p = src.prototypes(x[None], _mask(torch.from_numpy(disk))[None])
    assert torch.allclose(p.of("fg", EDGE), _e(1)[None], atol=1e-6)  # inner ring
    assert torch.allclose(p.of("bg", EDGE), _e(3)[None], atol=1e-6)  # outer ring


def test_a_tiny_object_still_gives_a_foreground_prototype():
    x = _feats(torch.full((16, 16), KG))
    x[:, 5, 6] = A  # the object's cell
    m = torch.zeros(1, 256, 256)
    m[:, 5 * 16 + 4 : 5 * 16 + 8, 6 * 16 + 4 : 6 * 16 + 8] = 1  # 1/16 of one cell
    p = HardPrototypes(HardPrototypesConfig(), C).prototypes(x[None], m[None])
    assert p.of("fg", GLOBAL) @ A > 0.99 and p.of("fg", NORMAL) @ A > 0.99


def test_multi_shot_concatenates_per_type():
    src = HardPrototypes(HardPrototypesConfig(dim=32), C)
    s0, m0, *_ = _support_scene(seed=0)
    q, obj, _ = _query_scene(seed=5)
    m1 = _mask(obj)
    both = src.prototypes(torch.stack([s0, q]), torch.stack([m0, m1]))
    one, two = src.prototypes(s0[None], m0[None]), src.prototypes(q[None], m1[None])
    for side in ("fg", "bg"):
        for kind in (GLOBAL, EDGE, NORMAL, HARD):
            want = torch.cat([one.of(side, kind), two.of(side, kind)])
            assert torch.allclose(both.of(side, kind), want, atol=1e-5)
    assert both.of("fg", GLOBAL).shape == (2, 32)


def test_projection_init():
    assert torch.equal(
        HardPrototypes(HardPrototypesConfig(), C).proj.weight[:, :, 0, 0], torch.eye(C)
    )
    w = HardPrototypes(HardPrototypesConfig(dim=32), C).proj.weight[:, :, 0, 0]
    assert w.shape == (32, C) and torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    w2 = HardPrototypes(HardPrototypesConfig(dim=32), C).proj.weight
    assert torch.equal(w, w2[:, :, 0, 0])  # seeded


# ------------------------------------------------------------------ forward


@pytest.mark.parametrize("h", [16, 32])
def test_output_shapes_and_points_in_range(h):
    out = _run(HardPrototypes(HardPrototypesConfig(points_pos=2, points_neg=3), C), h=h)
    assert out.mask_logits.shape == (2, 1, 4 * h, 4 * h) and out.aux_logits is out.mask_logits
    assert out.points.shape == (2, 5, 2) and out.point_labels.shape == (2, 5)
    assert ((out.points >= 0) & (out.points <= 16 * h)).all()
    assert out.dense is None and out.memory is None


def test_gradients_reach_projection_heads_and_temperature():
    src = HardPrototypes(HardPrototypesConfig(dim=32), C)
    out = _run(src)
    target = torch.randn(out.mask_logits.shape, generator=torch.Generator().manual_seed(0))
    (out.mask_logits * target).sum().backward()
    for p in (src.proj.weight, src.head_fg[-1].weight, src.head_bg[-1].weight, src.temperature):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_same_inputs_give_bit_identical_outputs():
    src = HardPrototypes(HardPrototypesConfig(dim=48, points_pos=2, points_neg=2), C)
    torch.manual_seed(1)
    a = _run(src)
    torch.manual_seed(2)
    torch.randn(100)
    b = _run(src)
    assert torch.equal(a.mask_logits, b.mask_logits)
    assert torch.equal(a.points, b.points) and torch.equal(a.point_labels, b.point_labels)


def test_untrained_source_separates_the_object_and_clicks_on_it():
    h = 16
    src = HardPrototypes(HardPrototypesConfig(points_pos=2, points_neg=2), C)
    sx, sm, *_ = _support_scene()
    qx, obj, distractor = _query_scene()
    out = src(_imf(qx[None]), None, _ctx(sx[None], sm[None], h))
    up = out.mask_logits[0, 0]
    core = torch.from_numpy(ndimage.binary_erosion(obj.numpy(), np.ones((3, 3))))
    near = torch.from_numpy(ndimage.binary_dilation(obj.numpy(), np.ones((3, 3))))

    def px(cells):
        return cells.repeat_interleave(4, 0).repeat_interleave(4, 1)

    assert (up[px(core)] > 0).all() and (up[px(~near)] < 0).all()
    cell = (out.points[0] * h / 256).floor().long()  # (P, 2) col, row
    labels = out.point_labels[0]
    assert (labels >= 0).all()
    assert labels.tolist() == [1, 1, 0, 0]
    for (col, row), label in zip(cell.tolist(), labels.tolist(), strict=True):
        assert bool(obj[row, col]) == (label == 1)  # positives on the object, negatives off it
    col, row = cell[2].tolist()
    assert distractor[row, col]  # the strongest negative: on the false-positive-like distractor


def test_without_positive_cells_the_global_maximum_is_the_click_and_the_rest_pads():
    sx, sm, *_ = _support_scene()
    background = _feats(torch.full((16, 16), KG), seed=9)  # nothing like the object
    src = HardPrototypes(HardPrototypesConfig(points_pos=3, points_neg=0), C)
    out = src(_imf(background[None]), None, _ctx(sx[None], sm[None], 16))
    assert (out.mask_logits < 0).all()
    assert out.point_labels.tolist() == [[1, -1, -1]]
    assert (out.points[0, 0] > 0).all() and (out.points[0, 1:] == 0).all()


def test_query_index_pairs_queries_with_their_own_supports():
    h = 16
    src = HardPrototypes(HardPrototypesConfig(dim=32), C)
    s0, m0, *_ = _support_scene(seed=0)
    s1, m1, *_ = _support_scene(seed=3)
    qx = torch.stack([_query_scene(seed=1)[0], _query_scene(seed=2)[0]])
    index = torch.tensor([0, 1])
    a = src(_imf(qx), None, _ctx(torch.stack([s0, s1]), torch.stack([m0, m1]), h, index))
    other, other_mask, _ = _query_scene(seed=7)
    b = src(
        _imf(qx),
        None,
        _ctx(torch.stack([s0, other]), torch.stack([m0, _mask(other_mask)]), h, index),
    )
    assert torch.equal(a.mask_logits[0], b.mask_logits[0])
    assert torch.equal(a.points[0], b.points[0])
    assert not torch.allclose(a.mask_logits[1], b.mask_logits[1], atol=1e-3)


def test_no_support_gives_an_empty_contribution():
    x = _query_scene()[0][None]
    out = HardPrototypes(HardPrototypesConfig(), C)(
        _imf(x), None, SourceContext(sam=None, image_size=256)
    )
    assert out == PromptContribution()


# ------------------------------------------------------------------ errors


def test_bad_support_masks_and_counts_raise_with_the_fix():
    src = HardPrototypes(HardPrototypesConfig(max_supports=2), C)
    sx, sm, *_ = _support_scene()
    with pytest.raises(ValueError, match="support mask 1 is empty: give a mask with at least one"):
        src.prototypes(torch.stack([sx, sx]), torch.stack([sm, torch.zeros_like(sm)]))
    with pytest.raises(ValueError, match="support mask 0 is all foreground: the background"):
        src.prototypes(sx[None], torch.ones_like(sm)[None])
    with pytest.raises(ValueError, match=r"expected \(1, 1, 256, 256\)"):
        src.prototypes(sx[None], sm[None, :, :128, :128], image_size=256)
    with pytest.raises(ValueError, match=r"expected \(1, 1, 256, 256\)"):  # through forward
        src(_imf(sx[None]), None, _ctx(sx[None], sm[None, :, :128, :128], 16))
    three = sx[None].expand(3, -1, -1, -1)
    with pytest.raises(ValueError, match="max_supports=2: give fewer supports or raise"):
        src(_imf(sx[None]), None, _ctx(three, sm[None].expand(3, -1, -1, -1), 16))
    lonely = _ctx(sx[None], sm[None], 16, query_index=torch.tensor([0]))
    with pytest.raises(ValueError, match="query 1 has no support"):
        src(_imf(torch.stack([sx, sx])), None, lonely)


@pytest.mark.parametrize(
    "key, value",
    [
        ("dim", 0),
        ("hard", -1),
        ("normal", -1),
        ("edge_width", 0),
        ("temperature", 0.0),
        ("max_supports", 0),
    ],
)
def test_config_validation_names_the_key(key, value):
    with pytest.raises(ValueError, match=f"sources.hard_prototypes.{key}={value}: use"):
        HardPrototypesConfig(**{key: value})


def test_kind_vectors_are_as_intended():  # guards the synthetic scenes above
    assert math.isclose(float(A @ FP), 1 / math.sqrt(2), rel_tol=1e-6)
    assert math.isclose(float(B @ G), 1 / math.sqrt(2), rel_tol=1e-6)
