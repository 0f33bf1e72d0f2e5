"""Bad prompt and image inputs: one clear error naming the fix, or a documented normalisation,
the same through the Python API (`check_prompt`, `Predictor`, `propagate_volume`) and
`samed2 predict` (exit 2, the message on stderr, no traceback, no output written)."""

import json
import logging
import math
import re

import numpy as np
import pytest
from PIL import Image

from samed2_kit.cli import main
from samed2_kit.model.assemble import save as save_model
from samed2_kit.model.predictor import MIN_IMAGE_SIDE, Predictor
from samed2_kit.predict import read_prompts
from samed2_kit.prompts import check_prompt
from tests._dicom import write_series

H, W = 48, 64  # the synthetic image: (rows, columns)
BOX = [8, 6, 40, 30]  # x0, y0, x1, y1 inside it
NAMES = {"points": "point_coords", "labels": "point_labels"}
EMPTY = "is empty: give a box and/or points"
LABELS = r"labels: 1 = foreground, 0 = background"
NONFINITE = "NaN or infinite values: give finite pixel coordinates"


def _image(channels: int | None = 3) -> np.ndarray:
    """A seeded (H, W, channels) uint8 image ((H, W) for None)."""
    shape = (H, W) if channels is None else (H, W, channels)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def run_dir(tiny_model, tmp_path):
    return save_model(tiny_model, tmp_path / "run", {"recipe": {}})


@pytest.fixture
def pred(tiny_model):
    p = Predictor(tiny_model)
    p.set_image(_image())
    return p


# ---- check_prompt: the rules every entry point shares ----

BAD_PROMPTS = [  # (prompt, error substring as a regex)
    ({"points": [], "labels": []}, EMPTY),
    ({"points": np.zeros((0, 2))}, EMPTY),
    ({"box": []}, EMPTY),
    (
        {"box": [], "points": [], "labels": []},
        r"box \[x0, y0, x1, y1\], points \[\[x, y\], \.\.\.\]",
    ),
    ({"box": [math.nan, 1, 5, 5]}, rf"box \[nan, 1\.0, 5\.0, 5\.0\] holds {NONFINITE}"),
    ({"box": [1, 1, math.inf, 5]}, f"box .*{NONFINITE}"),
    ({"points": [[math.nan, 2]]}, f"points .*{NONFINITE}"),
    ({"points": [[1, -math.inf]], "labels": [1]}, f"points .*{NONFINITE}"),
    ({"box": ["1", 1, 5, 5]}, "box must be numbers .* got text values"),
    ({"points": [[1, 2]], "labels": [5]}, rf"labels \[5\]: each must be 1 or 0 \({LABELS}\)"),
    ({"points": [[1, 2]], "labels": [-1]}, LABELS),
    ({"points": [[1, 2]], "labels": [0.5]}, LABELS),
    ({"points": [[1, 2]], "labels": ["1"]}, LABELS),
    ({"points": [[1, 2]], "labels": [math.nan]}, LABELS),
    ({"points": [[1, 2], [3, 4]], "labels": [1]}, "2 points but 1 labels: give one label per"),
    ({"box": [1, 1, 5, 5], "labels": [1]}, "labels given without points"),
    ({"points": [[[1, 2]]]}, r"points must be a list of \[x, y\] \(shape \(N, 2\)\)"),
    ({"points": [1, 2, 3, 4]}, r"shape \(N, 2\)\), got shape \(4,\)"),
    ({"points": [[11, 2]]}, r"points \[\[11\.0, 2\.0\]\] lies outside the 10x8 \(WxH\) image"),
    ({"box": [0, 0, 10, 9]}, r"box \[\[10\.0, 9\.0\]\] lies outside the 10x8 \(WxH\) image"),
]


@pytest.mark.parametrize(("prompt", "message"), BAD_PROMPTS)
def test_check_prompt_refuses_bad_prompts(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt, (8, 10))


def test_check_prompt_normalisations():
    """Empty lists are left-out fields, box corners are sorted, labels default to foreground,
    the image's edges (x = W, y = H) are inside."""
    p = check_prompt({"box": [7, 6, 1, 2], "points": [], "labels": []}, (8, 10))
    assert p.box.tolist() == [1, 2, 7, 6] and p.points is None and p.labels is None
    assert check_prompt({"box": [1, 6, 7, 2]}, (8, 10)).box.tolist() == [1, 2, 7, 6]
    many = check_prompt({"box": [[7, 6, 1, 2], [0, 0, 3, 3]]}, (8, 10), many_boxes=True)
    assert many.box.tolist() == [[1, 2, 7, 6], [0, 0, 3, 3]]
    p = check_prompt({"points": [[1, 2], [3, 4]], "box": []}, (8, 10))
    assert p.box is None and p.labels.tolist() == [1, 1]
    assert check_prompt({"points": [4, 5]}, (8, 10)).points.tolist() == [[4, 5]]  # one [x, y]
    assert check_prompt({"points": [[10, 8]], "labels": [True]}, (8, 10)).labels.tolist() == [1]


@pytest.mark.parametrize(("prompt", "message"), BAD_PROMPTS[:-2])
def test_a_prompts_file_follows_the_same_rules(tmp_path, prompt, message):
    """Everything check_prompt refuses without the image size, read_prompts refuses too (the
    range checks come later, against the image)."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_json(prompt)))
    with pytest.raises(ValueError, match=f"prompts file {re.escape(str(path))}: .*(?:{message})"):
        read_prompts(path)


def test_a_prompts_file_and_the_api_agree_on_points_without_labels(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"points": [[1, 2], [3, 4]], "box": [7, 6, 1, 2]}')
    from_file = read_prompts(path)["image"]
    from_api = check_prompt({"points": [[1, 2], [3, 4]], "box": [7, 6, 1, 2]}, (8, 10))
    for field in ("box", "points", "labels"):
        np.testing.assert_array_equal(getattr(from_file, field), getattr(from_api, field))


def _json(prompt: dict) -> dict:
    """`prompt` with arrays as lists (json.dumps writes NaN / Infinity, as Python reads them)."""
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in prompt.items()}


# ---- Predictor.predict ----


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"point_coords": [], "point_labels": []}, "predict needs at least one prompt"),
        ({"box": []}, r"at least one prompt: point_coords \(\+ point_labels\), box or mask_input"),
        ({"box": np.zeros((0, 4)), "mask_input": []}, "at least one prompt"),
        ({"box": [math.nan, 1, 5, 5]}, f"box .*{NONFINITE}"),
        ({"point_coords": [[math.inf, 3]]}, f"point_coords .*{NONFINITE}"),
        ({"point_coords": [[3, 3]], "point_labels": [5]}, rf"point_labels \[5\]: .*{LABELS}"),
        ({"point_coords": [[3, 3]], "point_labels": [0.5]}, LABELS),
        ({"point_coords": [[3, 3], [4, 4]], "point_labels": [1]}, "2 point_coords but 1"),
        ({"box": BOX, "point_labels": [1]}, "point_labels given without point_coords"),
        ({"box": [0, 0, W + 1, 10]}, f"lies outside the {W}x{H} \\(WxH\\) image"),
        ({"box": BOX, "mask_input": np.full((1, 64, 64), np.nan)}, "mask_input holds NaN"),
    ],
)
def test_predict_refuses_bad_prompts(pred, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pred.predict(**kwargs)


def test_predict_normalises_like_check_prompt(pred):
    """A reversed box gives the ordered box's mask; points without labels are foreground; an
    empty list is a left-out argument."""
    ordered, s1, _ = pred.predict(box=BOX, multimask_output=False, return_logits=True)
    x0, y0, x1, y1 = BOX
    for box in ([x1, y1, x0, y0], [x0, y1, x1, y0], [x1, y0, x0, y1]):
        logits, s2, _ = pred.predict(box=box, multimask_output=False, return_logits=True)
        np.testing.assert_array_equal(logits, ordered)
        np.testing.assert_array_equal(s2, s1)
    pts = [[20, 20], [30, 12]]
    labelled, _, _ = pred.predict(point_coords=pts, point_labels=[1, 1], return_logits=True)
    for labels in (None, []):
        unlabelled, _, _ = pred.predict(point_coords=pts, point_labels=labels, return_logits=True)
        np.testing.assert_array_equal(unlabelled, labelled)
    boxed, _, _ = pred.predict(box=BOX, point_coords=[], point_labels=[], return_logits=True,
                               multimask_output=False)  # fmt: skip
    np.testing.assert_array_equal(boxed, ordered)


# ---- Predictor.set_image ----


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 0)), f"0x0 \\(WxH\\) pixels; each side must be at least {MIN_IMAGE_SIDE} px"),
        (np.zeros((1, 1)), "is 1x1 .* at least 8 px: give the whole image"),
        (np.zeros((7, 40)), r"is 40x7 \(WxH\) pixels"),
        (np.zeros((0, 40, 3)), "at least 8 px"),
        (np.zeros((20, 20, 2)), r"\(H, W, 4\) RGBA array, got shape \(20, 20, 2\)"),
        (np.zeros((3, 20, 30)), r"channels first\? use image\.transpose\(1, 2, 0\)"),
        (np.zeros((4, 20, 20, 3)), r"for a volume, pass one slice \(volume\[z\]\)"),
        (np.full((20, 20), np.nan), "holds 400 NaN or infinite pixel values .*nan_to_num"),
        (np.where(np.eye(20) > 0, np.inf, 0.0), r"holds 20 NaN .* first at row 0, column 0"),
        (np.zeros((20, 20), complex), "dtype complex128: give integer or float pixel values"),
    ],
)
def test_set_image_refuses_bad_images(tiny_model, image, message):
    with pytest.raises(ValueError, match=f"set_image: .*{message}"):
        Predictor(tiny_model).set_image(image)


def test_rgba_drops_its_alpha_with_a_note_and_grey_may_keep_a_channel_axis(tiny_model, caplog):
    rgb, results = _image(), []
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)
    pred = Predictor(tiny_model)
    for image in (rgb, rgba):
        with caplog.at_level(logging.WARNING, logger="samed2_kit.model.predictor"):
            pred.set_image(image)
        results.append(pred.predict(box=BOX, return_logits=True)[0])
    np.testing.assert_array_equal(results[1], results[0])
    assert "RGBA image: the alpha channel is dropped" in caplog.text
    grey = _image(None)
    pred.set_image(grey[:, :, None])
    with_axis = pred.predict(box=BOX, return_logits=True)[0]
    pred.set_image(grey)
    np.testing.assert_array_equal(pred.predict(box=BOX, return_logits=True)[0], with_axis)


# ---- propagate_volume: the same prompt rules ----


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"points": [], "labels": []}, r"prompts\[1\] is empty: give a box and/or points"),
        ({"box": [1, 1, math.nan, 5]}, rf"prompts\[1\]\.box .*{NONFINITE}"),
        ({"points": [[3, 3]], "labels": [2]}, rf"prompts\[1\]\.labels \[2\]: .*{LABELS}"),
        ({"box": [1, 1, 5, 5], "labels": [1]}, r"prompts\[1\]\.labels given without points"),
        ({"box": [0, 0, 40, 5]}, r"prompts\[1\]\.box .* outside the 32x24"),
    ],
)
def test_propagate_volume_refuses_bad_prompts(tiny_model, prompt, message):
    volume = pytest.importorskip("samed2_kit.volume")
    with pytest.raises(ValueError, match=message):
        volume.propagate_volume(tiny_model, np.zeros((3, 24, 32), np.float32), {1: prompt})


# ---- samed2 predict ----


def _png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _prompts_file(tmp_path, data) -> str:
    path = tmp_path / "p.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _refused(argv, message, capsys, out) -> None:
    """`samed2 predict ...` exits 2 with `message` on stderr, no traceback, nothing at `out`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "samed2 predict: error: " in err and message in err, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"points": [], "labels": []}, "the prompt is empty: give a box and/or points"),
        ({"box": [], "points": []}, "box [x0, y0, x1, y1], points [[x, y], ...]"),
        ('{"box": [NaN, 5, 40, 30]}', "box [nan, 5.0, 40.0, 30.0] holds NaN or infinite"),
        ('{"points": [[Infinity, 5]]}', "points [[inf, 5.0]] holds NaN or infinite values"),
        ({"box": ["8", 6, 40, 30]}, "got text values"),
        ({"points": [[20, 20]], "labels": [5]}, "labels: 1 = foreground, 0 = background"),
        ({"points": [[20, 20]], "labels": [-1]}, "labels [-1]: each must be 1 or 0"),
        ({"points": [[20, 20]], "labels": [0.5]}, "labels [0.5]: each must be 1 or 0"),
        ({"points": [[20, 20], [30, 30]], "labels": [1]}, "2 points but 1 labels"),
        ({"box": BOX, "labels": [1]}, "labels given without points"),
        ({"points": [[[20, 20]]]}, "points must be a list of [x, y] (shape (N, 2))"),
        ({"box": [8, 6, 400, 30]}, f"lies outside the {W}x{H} (WxH) image"),
        ({"points": [[20, -1]]}, f"points [[20.0, -1.0]] lies outside the {W}x{H}"),
    ],
)
def test_cli_bad_prompts_exit_2(run_dir, tmp_path, capsys, data, message):
    image = _png(tmp_path / "img.png", _image())
    out = tmp_path / "out"
    argv = ["predict", str(run_dir), image, "--prompts", _prompts_file(tmp_path, data)]
    _refused([*argv, "--out", str(out)], message, capsys, out)


@pytest.mark.parametrize("size", [(1, 1), (5, 40)])
def test_cli_refuses_a_tiny_image(run_dir, tmp_path, capsys, size):
    image = _png(tmp_path / "tiny.png", np.zeros(size, np.uint8))
    out = tmp_path / "out"
    argv = ["predict", str(run_dir), image, "--prompts", _prompts_file(tmp_path, {"box": BOX})]
    h, w = size
    message = f"tiny.png: the image is {w}x{h} (WxH) pixels; each side must be at least 8 px"
    _refused([*argv, "--out", str(out)], message, capsys, out)


def test_cli_normalises_like_the_api(run_dir, tmp_path, capsys, tiny_model):
    """An RGBA PNG is read as its RGB (alpha dropped), a reversed box gives the ordered box's
    mask, and points without labels give the Predictor's mask for all-foreground labels."""
    rgb = _image()
    rgba = np.concatenate([rgb, np.full((H, W, 1), 128, np.uint8)], axis=2)
    x0, y0, x1, y1 = BOX
    runs = {
        "rgb_box": (rgb, {"box": BOX}),
        "rgba_box": (rgba, {"box": BOX}),
        "rgb_reversed": (rgb, {"box": [x1, y1, x0, y0]}),
        "rgb_points": (rgb, {"points": [[20, 20], [30, 12]], "box": []}),
    }
    masks = {}
    for name, (array, data) in runs.items():
        image = _png(tmp_path / f"{name}.png", array)
        prompts = _prompts_file(tmp_path, data)
        assert main(["predict", str(run_dir), image, "--prompts", prompts, "--out",
                     str(tmp_path / "out")]) == 0  # fmt: skip
        masks[name] = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
    capsys.readouterr()
    np.testing.assert_array_equal(masks["rgba_box"], masks["rgb_box"])
    np.testing.assert_array_equal(masks["rgb_reversed"], masks["rgb_box"])
    pred = Predictor(tiny_model)
    pred.set_image(rgb)
    api, _, _ = pred.predict(point_coords=[[20, 20], [30, 12]], point_labels=[1, 1],
                             multimask_output=False)  # fmt: skip
    np.testing.assert_array_equal(masks["rgb_points"] > 0, api[0])


# ---- samed2 predict --series-uid ----

UIDS = ("1.2.826.0.1.3680043.8.498.501", "1.2.826.0.1.3680043.8.498.502")


def test_series_uid_picks_one_series_of_a_dicom_folder(run_dir, tmp_path, capsys):
    pytest.importorskip("samed2_kit.volume")
    pytest.importorskip("highdicom")
    folder = tmp_path / "two_series"
    for uid in UIDS:
        write_series(folder, uid)
    prompts = _prompts_file(tmp_path, {"slices": {"1": {"box": [4, 4, 11, 11]}}})
    out = tmp_path / "out"
    argv = ["predict", str(run_dir), str(folder), "--prompts", prompts, "--out", str(out)]
    _refused(argv, "holds 2 series; choose one: ", capsys, out)
    _refused(argv, "`samed2 predict --series-uid`", capsys, out)
    assert main([*argv, "--series-uid", UIDS[1]]) == 0
    assert f"wrote {out / 'two_series_mask.dcm'}" in capsys.readouterr().out
    import pydicom

    seg = pydicom.dcmread(out / "two_series_mask.dcm")
    refs = {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence}
    assert refs == {UIDS[1]}
    _refused([*argv, "--series-uid", "1.2.3.4.5"], "no image series 1.2.3.4.5 here", capsys,
             out / "x")  # fmt: skip
    image = _png(tmp_path / "img.png", _image())
    png_argv = ["predict", str(run_dir), image, "--prompts", _prompts_file(tmp_path, {"box": BOX})]
    _refused([*png_argv, "--out", str(tmp_path / "o2"), "--series-uid", UIDS[0]],
             "--series-uid picks a series of a DICOM folder", capsys, tmp_path / "o2")  # fmt: skip
