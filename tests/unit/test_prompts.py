"""Tests for samed2_kit.prompts: box convention, jitter, point sampling, scaling, validation."""

import numpy as np
import pytest

from samed2_kit.prompts import (
    Prompt,
    PromptConfig,
    box_from_mask,
    check_prompt,
    sample_points,
    sample_prompt,
    scale_prompt,
)


def _rect(h=60, w=80, rows=(10, 20), cols=(30, 50)):
    mask = np.zeros((h, w), bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_tight_box_uses_max_index():
    box = box_from_mask(_rect())
    assert box.dtype == np.float32 and box.shape == (4,)
    np.testing.assert_array_equal(box, [30, 10, 49, 19])
    single = np.zeros((5, 9), bool)
    single[3, 7] = True
    np.testing.assert_array_equal(box_from_mask(single), [7, 3, 7, 3])


def test_empty_mask_box_is_a_clear_error():
    with pytest.raises(ValueError, match="mask is empty"):
        box_from_mask(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="rng"):
        box_from_mask(_rect(), jitter=0.1)


def test_jitter_bounds_and_determinism():
    mask = _rect()
    tight = box_from_mask(mask)
    w, h = 20, 10  # pixel extents of the rectangle
    boxes = np.stack([box_from_mask(mask, 0.2, np.random.default_rng(s)) for s in range(200)])
    limit = 0.2 * np.array([w, h, w, h]) + 1e-4
    assert np.all(np.abs(boxes - tight) <= limit)
    assert np.all(boxes[:, 0] <= boxes[:, 2]) and np.all(boxes[:, 1] <= boxes[:, 3])
    assert len({tuple(b) for b in boxes}) == 200  # every seed moves the box differently
    a = box_from_mask(mask, 0.2, np.random.default_rng(7))
    np.testing.assert_array_equal(a, box_from_mask(mask, 0.2, np.random.default_rng(7)))
    # a mask touching the image border: jittered boxes stay inside [0, W-1] x [0, H-1]
    edge = _rect(rows=(0, 60), cols=(70, 80))
    for s in range(100):
        x0, y0, x1, y1 = box_from_mask(edge, 0.5, np.random.default_rng(s))
        assert 0 <= x0 <= x1 <= 79 and 0 <= y0 <= y1 <= 59


def test_points_inside_and_outside():
    mask = _rect()
    rng = np.random.default_rng(3)
    coords, labels = sample_points(mask, n_pos=20, n_neg=20, rng=rng)
    assert coords.dtype == np.float32 and coords.shape == (40, 2)
    assert labels.dtype == np.int64 and labels.tolist() == [1] * 20 + [0] * 20
    np.testing.assert_array_equal(coords, np.round(coords))  # pixel indices (SAM adds +0.5)
    cols, rows = np.floor(coords).astype(int).T
    assert mask[rows[:20], cols[:20]].all()
    assert not mask[rows[20:], cols[20:]].any()
    # negatives sit near the object: inside the box enlarged by 10% (>= 2 px) per side
    assert cols[20:].min() >= 30 - 2 and cols[20:].max() <= 49 + 2
    assert rows[20:].min() >= 10 - 2 and rows[20:].max() <= 19 + 2
    again = sample_points(mask, 20, 20, np.random.default_rng(3))
    np.testing.assert_array_equal(coords, again[0])


def test_points_edge_cases():
    full = np.ones((3, 3), bool)
    with pytest.raises(ValueError, match="n_neg=0"):
        sample_points(full, 1, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="empty"):
        sample_points(np.zeros((3, 3), bool), 1, 0, np.random.default_rng(0))
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    coords, _ = sample_points(one, 3, 0, np.random.default_rng(0))  # more points than pixels
    np.testing.assert_array_equal(coords, [[2.0, 2.0]] * 3)
    # the whole neighbourhood is foreground: negatives come from anywhere else
    big = np.ones((40, 40), bool)
    big[0, 0] = False
    coords, _ = sample_points(big, 0, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(coords, [[0.0, 0.0]] * 2)


def test_sample_prompt_modes_and_config_validation():
    mask, rng = _rect(), np.random.default_rng(0)
    p = sample_prompt(mask, PromptConfig(), rng)
    assert p.box is not None and p.points is None and p.labels is None
    p = sample_prompt(mask, PromptConfig(mode="point", n_pos=2, n_neg=1), rng)
    assert p.box is None and p.points.shape == (3, 2) and p.labels.tolist() == [1, 1, 0]
    p = sample_prompt(mask, PromptConfig(mode="box+point", box_jitter=0.0), rng)
    np.testing.assert_array_equal(p.box, [30, 10, 49, 19])
    assert p.points.shape == (1, 2)
    with pytest.raises(ValueError, match="valid modes"):
        PromptConfig(mode="scribble")
    with pytest.raises(ValueError, match="n_pos"):
        PromptConfig(mode="point", n_pos=0, n_neg=0)


def test_scale_prompt():
    prompt = Prompt(
        box=np.array([0, 0, 800, 540], np.float32),
        points=np.array([[400, 270], [200, 135]], np.float32),
        labels=np.array([1, 0]),
    )
    out = scale_prompt(prompt, (540, 800), 256)
    np.testing.assert_allclose(out.box, [0, 0, 256, 256])
    np.testing.assert_allclose(out.points, [[128, 128], [64, 64]])
    assert out.box.dtype == np.float32 and out.labels.dtype == np.int64
    assert scale_prompt(Prompt(), (10, 10), 5) == Prompt()


def test_check_prompt_converts_and_keeps_values():
    p = check_prompt(
        {"box": [1, 2, 30, 40], "points": [[3, 4], [5, 6]], "labels": [1.0, 0]}, (50, 60)
    )
    assert p.box.dtype == np.float32 and p.box.shape == (4,)
    assert p.points.dtype == np.float32 and p.points.shape == (2, 2)
    assert p.labels.dtype == np.int64 and p.labels.tolist() == [1, 0]
    assert p.mask is None
    many = check_prompt(Prompt(box=[[0, 0, 5, 5], [1, 1, 60, 50]]), (50, 60), many_boxes=True)
    assert many.box.shape == (2, 4)
    # zero points are no points (empty = left out); points without labels are foreground
    p = check_prompt(Prompt(box=[0, 0, 5, 5], points=np.zeros((0, 2)), labels=[]), (10, 10))
    assert p.points is None and p.labels is None
    p = check_prompt({"points": [[1, 2], [3, 4]]}, (10, 10))
    assert p.labels.dtype == np.int64 and p.labels.tolist() == [1, 1]
    m = check_prompt({"mask": np.eye(4, dtype=np.uint8)}, (4, 4))
    assert m.mask.dtype == bool and m.mask.sum() == 4 and m.box is None


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        ({}, {"where": "prompts[3]"}, r"prompts\[3\] is empty: give a box and/or points"),
        ({"bbox": [0, 0, 1, 1]}, {}, r"unknown keys \['bbox'\]; use box, points, labels, mask"),
        ({"mask": np.ones((2, 2))}, {"fields": ("box",)}, r"unknown keys \['mask'\]; use box"),
        ([1, 2, 3, 4], {}, "got a list: give a Prompt or a dict"),
        ({"box": [0, 0, 1]}, {}, r"box must be 4 numbers .* got shape \(3,\)"),
        ({"box": [[0, 0, 1, 1], [0, 0, 2, 2]]}, {}, "box must be 4 numbers"),
        ({"points": [[1, 2, 3]]}, {}, r"points must be a list of \[x, y\]"),
        ({"box": [0, 0, 1, 1], "labels": [1]}, {"where": "p"}, r"p\.labels given without points"),
        ({"points": [[1, 2]], "labels": [1, 0]}, {}, "1 points but 2 labels"),
        (
            {"points": [[1, 2]], "labels": [2]},
            {},
            r"labels \[2\]: each must be 1 or 0 \(labels: 1 = fo",
        ),
        ({"points": [[1, 2]], "labels": [-1]}, {}, "must be 1"),
        (
            {"points": [[11, 2]], "labels": [1]},
            {},
            r"points \[\[11\.0, 2\.0\]\] lies outside the 10x8",
        ),
        ({"points": [[1, -1]], "labels": [1]}, {}, "points .* lies outside"),
        (
            {"box": [0, 0, 10, 9]},
            {"where": "s"},
            r"s\.box \[\[10\.0, 9\.0\]\] lies outside the 10x8",
        ),
        ({"mask": np.ones((8, 11), bool)}, {}, r"mask is \(8, 11\), the image is \(8, 10\)"),
        ({"mask": np.ones((8, 10)), "box": [0, 0, 1, 1]}, {}, "give it without points/box"),
        (
            {"labels": [1]},
            {"names": {"points": "point_coords", "labels": "point_labels"}},
            "point_labels given without point_coords",
        ),
        (
            {"points": [[1, 2], [3, 4]], "labels": [1]},
            {"names": {"points": "point_coords", "labels": "point_labels"}},
            "2 point_coords but 1 point_labels",
        ),
    ],
)
def test_check_prompt_errors_name_the_field_and_the_fix(prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt, (8, 10), **kwargs)


def test_check_prompt_without_a_size_checks_shapes_only():
    p = check_prompt({"box": [0, 0, 5000, 5000]})
    assert p.box.tolist() == [0, 0, 5000, 5000]
    with pytest.raises(ValueError, match="scale_prompt"):
        scale_prompt(Prompt(mask=np.ones((2, 2), bool)), (2, 2), 4)


def test_a_mask_input_is_refined_by_points_or_a_box():
    import numpy as np
    import pytest

    from samed2_kit.prompts import check_prompt

    m = np.zeros((8, 10), np.uint8)
    m[2:5, 3:6] = 1
    p = check_prompt({"points": [[4, 3]], "labels": [1], "mask_input": m}, (8, 10))
    assert p.mask_input.dtype == bool and p.mask_input.sum() == 9
    with pytest.raises(ValueError, match="mask_input is refined by points or a box"):
        check_prompt({"mask_input": m}, (8, 10))
    with pytest.raises(ValueError, match=r"mask_input is \(3, 3\), the image is \(8, 10\)"):
        check_prompt({"box": [0, 0, 4, 4], "mask_input": m[:3, :3]}, (8, 10))
