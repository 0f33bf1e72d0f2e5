"""Tests for samed2_kit.medbank.io.image: dtype, channel order, content sniffing, mask rules."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from samed2_kit.medbank.io.image import read_image, read_mask

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
SAMPLE = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data"


def _rgb(h=6, w=5, dtype=np.uint8, hi=255):
    rng = np.random.default_rng(0)
    return rng.integers(0, hi, size=(h, w, 3), endpoint=True).astype(dtype)


def _write(path: Path, rgb_or_grey: np.ndarray) -> Path:
    arr = rgb_or_grey
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    assert cv2.imwrite(str(path), arr)
    return path


@pytest.mark.parametrize("ext", [".png", ".tif", ".bmp"])
def test_grey_uint8_roundtrip(tmp_path, ext):
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5) * 8
    out = read_image(_write(tmp_path / f"g{ext}", grey))
    assert out.dtype == np.uint8 and out.shape == (6, 5)
    np.testing.assert_array_equal(out, grey)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_uint16_grey_and_rgb_keep_dtype(tmp_path, ext):
    grey = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000).astype(np.uint16)
    out = read_image(_write(tmp_path / f"g16{ext}", grey))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, grey)
    rgb = _rgb(dtype=np.uint16, hi=65535)
    out = read_image(_write(tmp_path / f"c16{ext}", rgb))
    assert out.dtype == np.uint16 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, rgb)


def test_float_tiff_keeps_dtype(tmp_path):
    arr = np.linspace(-1000.0, 1000.0, 30, dtype=np.float32).reshape(6, 5)
    out = read_image(_write(tmp_path / "f.tif", arr))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, arr)


def test_rgb_png_comes_back_in_rgb_order(tmp_path):
    rgb = _rgb()
    rgb[0, 0] = (255, 0, 0)  # pure red must stay in channel 0
    out = read_image(_write(tmp_path / "c.png", rgb))
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.concatenate([_rgb(), np.full((6, 5, 1), 7, np.uint8)], axis=2)
    out = read_image(_write(tmp_path / "a.png", rgba))
    assert out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, rgba[:, :, :3])


def test_jpeg_bytes_in_png_name_decode_by_content(tmp_path):
    rgb = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    path = tmp_path / "looks_like.png"
    path.write_bytes(buf.tobytes())
    out = read_image(path)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).max() <= 3  # lossy, colours within JPEG error, RGB order


def test_palette_tga_falls_back_to_pillow(tmp_path):
    from PIL import Image

    img = Image.new("P", (4, 3))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((1, 2), 1)
    img.save(tmp_path / "p.tga")  # OpenCV cannot decode TGA
    out = read_image(tmp_path / "p.tga")
    assert out.shape == (3, 4, 3)
    assert tuple(out[2, 1]) == (10, 200, 30) and tuple(out[0, 0]) == (0, 0, 0)


def test_text_file_named_png_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="notes.png") as err:
        read_image(path)
    assert "PNG" in str(err.value) and "JPEG" in str(err.value)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png"):
        read_image(empty)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_read_mask_rgb_and_jpeg_noise(tmp_path):
    values = np.array([[0, 30, 200, 255]], np.uint8)
    rgb = np.repeat(values[:, :, None], 3, axis=2)
    mask = read_mask(_write(tmp_path / "m.png", rgb))
    assert mask.dtype == bool and mask.shape == (1, 4)
    np.testing.assert_array_equal(mask, [[False, False, True, True]])
    # channels that differ: channel max decides
    rgb2 = np.zeros((1, 2, 3), np.uint8)
    rgb2[0, 1, 2] = 255
    np.testing.assert_array_equal(read_mask(_write(tmp_path / "m2.png", rgb2)), [[False, True]])
    assert read_mask(tmp_path / "m.png", threshold=20).tolist() == [[False, True, True, True]]


def test_read_mask_01_labels_and_label_maps(tmp_path):
    np.testing.assert_array_equal(
        read_mask(_write(tmp_path / "b.png", np.array([[0, 1, 1]], np.uint8))),
        [[False, True, True]],
    )
    label_map = _write(tmp_path / "labels.png", np.array([[0, 1, 7, 8]], np.uint8))
    with pytest.raises(ValueError, match="labels.png.*multi-label"):
        read_mask(label_map)
    assert read_mask(label_map, threshold=0).tolist() == [[False, True, True, True]]
    assert not read_mask(_write(tmp_path / "z.png", np.zeros((2, 2), np.uint8))).any()


def test_hc18_sample_mask_is_rgb_and_binary():
    path = SAMPLE / "hc18" / "masks" / "000_HC_Annotation.png"
    assert read_image(path).shape == (540, 800, 3)
    mask = read_mask(path)
    assert mask.shape == (540, 800) and 0.01 < mask.mean() < 0.5
    assert read_image(SAMPLE / "hc18" / "images" / "000_HC.png").shape == (540, 800)


def test_busi_jpeg_png_and_kvasir_jpeg_masks():
    busi, kvasir = SHARED / "busi", SHARED / "kvasir_seg"
    if not busi.is_dir() or not kvasir.is_dir():
        pytest.skip("shared data folder ../shared/data not available")
    img = read_image(busi / "images" / "benign_1.png")
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8
    raw = read_image(busi / "masks" / "benign_4_mask_1.png")
    mask = read_mask(busi / "masks" / "benign_4_mask_1.png")
    np.testing.assert_array_equal(mask, raw.max(axis=2) > 127)
    kmask_path = sorted((kvasir / "masks").iterdir())[0]
    kraw = read_image(kmask_path)
    assert len(np.unique(kraw)) > 2  # JPEG noise is real
    kmask = read_mask(kmask_path)
    assert kmask.dtype == bool and kmask.any() and not kmask.all()
