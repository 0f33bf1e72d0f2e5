"""Hand-computed checks of samed2_kit.metrics (MONAI-backed Dice / NSD / HD95)."""

import math
import warnings

import numpy as np
import pytest
import torch

from samed2_kit.metrics import CaseMetrics, case_metrics, summarize


def _square(shift_cols: int = 0, shape=(32, 32)) -> np.ndarray:
    """10x10 square at rows 5..14, cols 5+shift..14+shift."""
    m = np.zeros(shape, dtype=bool)
    m[5:15, 5 + shift_cols : 15 + shift_cols] = True
    return m


# Square A vs A shifted by 2 columns. Edge pixels (mask XOR erosion): 36 per square.
# Distances A-edge -> nearest B-edge (1 px spacing): 16 x 0, 4 x 1, 16 x 2 (same for B -> A).
# Overlap 8x10 = 80 px of 100 each -> Dice = 160 / 200 = 0.8.
A, B = _square(0), _square(2)


def test_identical_masks_are_perfect():
    m = case_metrics(A, A.copy())
    assert m == CaseMetrics(dice=1.0, nsd=1.0, hd95=0.0)


def test_offset_squares_dice_and_hd95():
    m = case_metrics(A, B, spacing=(1.0, 1.0))
    assert m.dice == pytest.approx(0.8, abs=1e-6)
    # 95th percentile of {16x0, 4x1, 16x2} (linear interpolation at rank 33.25 of 35) = 2
    assert m.hd95 == pytest.approx(2.0, abs=1e-6)
    assert case_metrics(A, B).hd95 == pytest.approx(2.0, abs=1e-6)  # spacing=None -> 1 mm


def test_isotropic_spacing_scales_hd95():
    m = case_metrics(A, B, spacing=(0.5, 0.5))
    assert m.hd95 == pytest.approx(1.0, abs=1e-6)
    assert m.dice == pytest.approx(0.8, abs=1e-6)  # Dice is spacing-independent


def test_anisotropic_spacing_uses_array_axis_order():
    # shift is along axis 1 (columns): column spacing 0.5 mm makes every distance <= 1 mm
    assert case_metrics(A, B, spacing=(1.0, 0.5)).hd95 == pytest.approx(1.0, abs=1e-6)
    # row spacing 0.5 mm does not shrink the 2-column offset
    assert case_metrics(A, B, spacing=(0.5, 1.0)).hd95 == pytest.approx(2.0, abs=1e-6)


def test_nsd_tolerance():
    assert case_metrics(A, B, nsd_tolerance_mm=2.0).nsd == pytest.approx(1.0)
    assert case_metrics(A, B, nsd_tolerance_mm=10.0).nsd == pytest.approx(1.0)
    # tolerance 0.5 px: only the 16 zero distances per direction count -> 32 / 72
    assert case_metrics(A, B, nsd_tolerance_mm=0.5).nsd == pytest.approx(4 / 9, abs=1e-6)
    # at 0.5 mm spacing the four 1-px distances become 0.5 mm -> (16 + 4) / 36
    tight = case_metrics(A, B, spacing=(0.5, 0.5), nsd_tolerance_mm=0.5)
    assert tight.nsd == pytest.approx(5 / 9, abs=1e-6)


def test_empty_conventions_without_warnings():
    empty = np.zeros_like(A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        both = case_metrics(empty, empty.copy())
        pred_only = case_metrics(A, empty)
        gt_only = case_metrics(empty, A)
    assert both == CaseMetrics(dice=1.0, nsd=1.0, hd95=0.0)
    for m in (pred_only, gt_only):
        assert m.dice == 0.0 and m.nsd == 0.0 and math.isnan(m.hd95)


def test_input_dtypes_and_types():
    ref = case_metrics(A, B)
    as_float = case_metrics(A.astype(np.float32), torch.from_numpy(B.astype(np.int64)))
    assert as_float == ref
    labels = case_metrics(A * 3, B.astype(np.uint8) * 255)  # nonzero = foreground
    assert labels == ref


def test_3d_volume_with_spacing():
    a = np.zeros((8, 16, 16), dtype=np.uint8)
    a[2:6, 4:10, 4:10] = 1
    b = np.zeros_like(a)
    b[3:7, 4:10, 4:10] = 1  # shifted 1 slice along axis 0 -> overlap 3 of 4 slices
    m1 = case_metrics(a, b)
    m2 = case_metrics(a, b, spacing=(2.0, 1.0, 1.0))
    assert m1.dice == pytest.approx(0.75, abs=1e-6)
    assert m1.hd95 == pytest.approx(1.0, abs=1e-6)
    assert m2.hd95 == pytest.approx(2.0, abs=1e-6)  # slice thickness 2 mm
    assert m2.nsd == pytest.approx(1.0)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as err:
        case_metrics(np.zeros((32, 32)), np.zeros((32, 30)))
    assert "(32, 32)" in str(err.value) and "(32, 30)" in str(err.value)


def test_bad_spacing_and_ndim():
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(A, B, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(A, B, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="2D"):
        case_metrics(np.zeros(5), np.zeros(5))


def test_summarize_ignores_nan():
    values = [
        CaseMetrics(dice=0.8, nsd=1.0, hd95=2.0),
        CaseMetrics(dice=0.0, nsd=0.0, hd95=float("nan")),
        CaseMetrics(dice=1.0, nsd=0.5, hd95=4.0),
    ]
    s = summarize(values)
    assert s["dice"] == pytest.approx(0.6)
    assert s["nsd"] == pytest.approx(0.5)
    assert s["hd95"] == pytest.approx(3.0)
    assert s["n"] == 3 and s["hd95_undefined"] == 1


def test_summarize_all_nan_and_empty():
    s = summarize([CaseMetrics(dice=0.0, nsd=0.0, hd95=float("nan"))])
    assert math.isnan(s["hd95"]) and s["hd95_undefined"] == 1
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["dice"])
