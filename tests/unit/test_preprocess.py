"""Tests for samed2_kit.medbank.preprocess: modality rules, SAM 2 input, mask resizing."""

import numpy as np
import pytest
import torch

from samed2_kit.medbank.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize_intensity,
    resize_mask,
    to_model_input,
    to_model_input_batch,
)


def test_ct_window_hand_checked_values():
    hu = np.array([[-160, 240, 40, -1000, 3000, 140]], np.int16)
    out = normalize_intensity(hu, "ct")
    assert out.shape == (1, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.0, 1.0, 0.5, 0.0, 1.0, 0.75], atol=1e-6)
    assert np.array_equal(out[..., 0], out[..., 2])
    # auto: signed ints with min < -100 are HU
    np.testing.assert_allclose(normalize_intensity(hu), out)
    # custom window (level 50, width 100): 0 -> 0, 100 -> 1, 75 -> 0.75
    wide = normalize_intensity(np.array([[0.0, 100.0, 75.0]]), "ct", window=(50, 100))
    np.testing.assert_allclose(wide[0, :, 1], [0.0, 1.0, 0.75], atol=1e-6)
    # a window with "auto" means CT even for a positive float image
    np.testing.assert_allclose(normalize_intensity(np.array([[75.0]]), window=(50, 100)), 0.75)


def test_window_errors():
    with pytest.raises(ValueError, match="CT only"):
        normalize_intensity(np.zeros((2, 2)), "mr", window=(40, 400))
    with pytest.raises(ValueError, match="width"):
        normalize_intensity(np.zeros((2, 2)), "ct", window=(40, 0))


def test_mr_percentiles_clip_outliers():
    x = np.arange(1000, dtype=np.float64).reshape(20, 50)
    x[0, 0] = 1e6  # a hot pixel must not crush the rest
    out = normalize_intensity(x, "mr", percentiles=(1, 99))
    lo, hi = np.percentile(x, [1, 99])
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[10, 0, 0], (500 - lo) / (hi - lo), rtol=1e-6)
    assert normalize_intensity(np.full((4, 4), 7.0), "mr").max() == 0.0  # constant -> zeros


def test_2d_rules():
    u16 = np.array([[100, 300], [200, 100]], np.uint16)
    np.testing.assert_allclose(normalize_intensity(u16)[..., 0], [[0, 1], [0.5, 0]])
    u8 = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_allclose(normalize_intensity(u8, "us")[0, :, 0], [0, 0.2, 1], atol=1e-7)
    unit = np.array([[0.25, 0.5]], np.float32)
    np.testing.assert_allclose(normalize_intensity(unit)[..., 0], unit)  # already in [0, 1]
    wide = np.array([[2.0, 4.0, 6.0]])
    np.testing.assert_allclose(normalize_intensity(wide, "2d")[..., 0], [[0, 0.5, 1]])
    assert not normalize_intensity(np.full((3, 3), 900, np.uint16)).any()  # constant -> zeros
    # an image with negative values but min >= -100 is 2d (min-max), not CT
    np.testing.assert_allclose(normalize_intensity(np.array([[-50.0, 50.0]]))[0, :, 0], [0, 1])


def test_channels_grey_rgb_rgba():
    grey = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    out = normalize_intensity(grey)
    assert out.shape == (2, 3, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 17
    out = normalize_intensity(rgba)
    assert out.shape == (2, 2, 3) and out[..., 0].min() == 1.0 and out[..., 1:].max() == 0.0
    # 3-channel uint16 in auto mode -> 2d min-max jointly over channels (colour balance kept)
    rgb16 = np.stack([np.full((2, 2), 1000), np.full((2, 2), 3000), np.full((2, 2), 2000)], 2)
    np.testing.assert_allclose(normalize_intensity(rgb16.astype(np.uint16))[0, 0], [0, 1, 0.5])


def test_invalid_inputs():
    with pytest.raises(ValueError, match="NaN"):
        normalize_intensity(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="'dermoscopy'") as err:
        normalize_intensity(np.zeros((2, 2)), "petscan")
    assert "petscan" in str(err.value)
    with pytest.raises(ValueError, match="shape"):
        normalize_intensity(np.zeros((2, 2, 2)))


def test_to_model_input_imagenet_normalisation():
    mean_img = np.ones((40, 30, 3), np.float32) * np.array(IMAGENET_MEAN, np.float32)
    out = to_model_input(mean_img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert out.abs().max() < 1e-5
    ones = to_model_input(np.ones((10, 10, 3), np.float32), 8)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(ones[:, 3, 3], expected)
    # resize is bilinear + antialias: a left-right ramp stays monotonic and inside its range
    ramp = np.repeat(np.linspace(0, 1, 200, dtype=np.float32)[None, :, None], 3, 2).repeat(50, 0)
    r = to_model_input(ramp, 32)[0, 16] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.all(r[1:] > r[:-1]) and r.min() >= 0 and r.max() <= 1
    with pytest.raises(ValueError, match="normalize_intensity"):
        to_model_input(np.zeros((5, 5)), 8)
    batch = to_model_input_batch([mean_img, np.zeros((7, 9, 3), np.float32)], 16)
    assert batch.shape == (2, 3, 16, 16)


def test_to_model_input_matches_reference_interpolate():
    rng = np.random.default_rng(0)
    img = rng.random((37, 53, 3), dtype=np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None], (24, 24), mode="bilinear",
        align_corners=False, antialias=True,
    )[0]  # fmt: skip
    ref = (ref - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    torch.testing.assert_close(to_model_input(img, 24), ref)


def test_resize_mask_area_rule_and_thin_structures():
    mask = np.zeros((100, 100), bool)
    mask[20:60, 40:80] = True
    out = resize_mask(mask, 50)
    assert out.shape == (1, 50, 50) and out.dtype == torch.float32
    expected = torch.zeros(50, 50)
    expected[10:30, 20:40] = 1
    torch.testing.assert_close(out[0], expected)
    thin = np.zeros((512, 512), bool)
    thin[100:400, 200] = True  # one pixel wide: below half an output pixel at size 64
    small = resize_mask(thin, 64)
    assert small.sum() > 0 and set(small.unique().tolist()) <= {0.0, 1.0}
    assert resize_mask(np.zeros((9, 9), bool), 4).sum() == 0
    up = resize_mask(np.array([[True, False], [False, False]]), 4)
    torch.testing.assert_close(up[0, :2, :2], torch.ones(2, 2))
    assert up.sum() == 4
