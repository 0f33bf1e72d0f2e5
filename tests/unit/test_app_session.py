"""samed2_kit.app without the GUI: Session (clicks, candidates, box, undo, propagation, few-shot,
downloads), Engine.open, render and `samed2 app`'s errors, on the bundled sample files and the
tiny model: every mask is checked against Predictor / propagate_volume on the same prompts."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from samed2_kit.app import render
from samed2_kit.app.engine import Engine
from samed2_kit.app.files import open_input
from samed2_kit.app.session import Session, SlicePrompt
from samed2_kit.medbank.io import read_volume
from samed2_kit.medbank.io.volume import Volume
from samed2_kit.model.predictor import Predictor
from samed2_kit.predict import read_prompts
from samed2_kit.volume import propagate_volume

SAMPLES = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data"
HC = SAMPLES / "hc18" / "images" / "000_HC.png"  # 800 x 540 ultrasound, no pixel size
HC_MASK = SAMPLES / "hc18" / "masks" / "000_HC_Annotation.png"
HIPPO = SAMPLES / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"  # (Z, Y, X) 35, 51, 35


def _session(model, path, tmp_path, backend="torch") -> Session:
    s = Session(Engine.open(model, backend=backend), tmp_path / "work")
    s.open(open_input(path))
    return s


def _reference(model, image) -> Predictor:
    pred = Predictor(model)
    pred.set_image(image)
    return pred


def _slab(opened, z0: int, z1: int):
    """Slices z0..z1-1 of a real volume, its geometry kept (origin moved to slice z0): a short
    volume so that propagation stays fast on the CPU."""
    vol = opened.volume
    affine = vol.affine.copy()
    affine[:3, 3] += affine[:3, 2] * z0
    slab = Volume(vol.array[z0:z1].copy(), vol.spacing, affine, dict(vol.meta))
    return dataclasses.replace(opened, volume=slab)


# --- 2D clicks ------------------------------------------------------------------------------------


def test_click_candidates_choose_and_a_negative_click_match_the_predictor(tiny_model, tmp_path):
    s = _session(tiny_model, HC, tmp_path)
    image = s.opened.volume.array[0]
    assert s.shape == (1, 540, 800) and s.opened.kind == "image"
    ref = _reference(tiny_model, image)

    s.click(400, 270, "positive")
    want, scores, _ = ref.predict(point_coords=[[400, 270]], point_labels=[1],
                                  multimask_output=True)  # fmt: skip
    best = int(np.argmax(scores))
    assert s.prompt.points == [[400.0, 270.0]] and s.prompt.labels == [1]
    assert len(s.candidates[0]) == 3 and s.candidates[0].shape == (3, 540, 800)
    assert np.array_equal(s.candidates[1], scores) and s.choice == best
    assert np.array_equal(s.masks[0], want[best]) and s.masks[0].any()
    assert s.summary() == f"mask: {int(want[best].sum())} px"  # no pixel size: no mm²
    for k in (2, 0, 1):
        s.choose(k)
        assert s.choice == k and np.array_equal(s.masks[0], want[k])
    assert len({int(m.sum()) for m in want}) > 1  # the candidates differ: choose changes the mask
    with pytest.raises(ValueError, match="no such candidate"):
        s.choose(3)

    s.click(120, 80, "negative")  # two points: one mask (multimask_output=False)
    want2, scores2, _ = ref.predict(point_coords=[[400, 270], [120, 80]], point_labels=[1, 0],
                                    multimask_output=False)  # fmt: skip
    assert s.prompt.labels == [1, 0] and len(s.candidates[0]) == 1
    assert np.array_equal(s.masks[0], want2[0]) and np.array_equal(s.candidates[1], scores2)
    assert not np.array_equal(want2[0], want[best])
    assert s.predictor.encoder_calls == 1 and not s.fresh_encode  # one encoder run, then decoder
    assert s.last_ms is not None and s.last_ms >= 0

    s.undo()  # back to the single click and the candidate chosen for it (1, not the best)
    assert s.prompt.points == [[400.0, 270.0]] and s.choice == 1 != best
    assert np.array_equal(s.masks[0], want[1]) and np.array_equal(s.candidates[1], scores)
    assert s.prompts_json() == {"points": [[400.0, 270.0]], "labels": [1]}  # no choice in it
    assert s.predictor.encoder_calls == 1


def test_box_undo_clear_and_the_prompts_file(tiny_model, tmp_path):
    s = _session(tiny_model, HC, tmp_path)
    ref = _reference(tiny_model, s.opened.volume.array[0])

    s.click(560, 400, "box")  # the first corner: no box, no mask yet
    assert s.prompt.corner == [560.0, 400.0] and s.prompt.box is None and s.prompt.empty()
    assert not s.masks.any() and s.candidates is None
    s.click(230, 120, "box")  # the opposite corner, given second: sorted
    assert s.prompt.box == [230.0, 120.0, 560.0, 400.0] and s.prompt.corner is None
    box_mask, _, _ = ref.predict(box=[230, 120, 560, 400], multimask_output=False)
    assert np.array_equal(s.masks[0], box_mask[0]) and len(s.candidates[0]) == 1
    box_only = s.masks[0].copy()

    s.click(400, 260, "positive")
    both, _, _ = ref.predict(point_coords=[[400, 260]], point_labels=[1],
                             box=[230, 120, 560, 400], multimask_output=False)  # fmt: skip
    assert np.array_equal(s.masks[0], both[0]) and not np.array_equal(both[0], box_only)
    assert s.predictor.encoder_calls == 1

    # the prompts file: what `samed2 predict --prompts` reads, the same prompt
    assert s.prompts_json() == {"box": [230.0, 120.0, 560.0, 400.0], "points": [[400.0, 260.0]],
                                "labels": [1]}  # fmt: skip
    path = s.write("prompts", tmp_path / "out")
    assert path == tmp_path / "out" / "000_HC_prompts.json"
    read = read_prompts(path)["image"]
    assert np.allclose(read.box, [230, 120, 560, 400]) and np.allclose(read.points, [[400, 260]])
    assert read.labels.tolist() == [1]

    s.undo()  # the point goes: the box's prompt and exactly its mask again
    assert s.prompt == SlicePrompt(box=[230.0, 120.0, 560.0, 400.0])
    assert np.array_equal(s.masks[0], box_only)
    s.undo()  # the box goes: back to its first corner, no mask
    assert s.prompt == SlicePrompt(corner=[560.0, 400.0]) and not s.masks.any()
    s.undo()
    assert 0 not in s.prompts and s.prompts_json() == {}
    with pytest.raises(ValueError, match="nothing to undo"):
        s.undo()

    # errors leave the prompt and the mask as they were
    s.click(400, 260, "positive")
    before = s.masks.copy()
    for x, y in [(-3, 100), (100, 540), (800.0, 10), (float("nan"), 10)]:
        with pytest.raises(ValueError, match="outside the 800 x 540 image: click on the image"):
            s.click(x, y)
    with pytest.raises(ValueError, match="mode 'lasso'"):
        s.click(10, 10, "lasso")
    s.click(100, 100, "box")
    with pytest.raises(ValueError, match="less than a pixel apart: click the opposite corner"):
        s.click(100.6, 300, "box")
    assert s.prompt.corner == [100.0, 100.0] and s.prompt.box is None
    assert np.array_equal(s.masks, before) and s.predictor.encoder_calls == 1

    s.clear()
    assert s.prompts == {} and s.history == [] and not s.masks.any() and s.candidates is None
    assert s.prompts_json() == {} and s.summary() == "mask: 0 px"
    s.click(400, 270)  # still open and encoded
    assert s.masks[0].any() and s.predictor.encoder_calls == 1


# --- volumes --------------------------------------------------------------------------------------


def test_volume_clicks_prompts_file_and_downloads(tiny_model, tmp_path):
    s = _session(tiny_model, HIPPO, tmp_path)
    assert s.shape == (35, 51, 35) and s.z == 17 and s.opened.geometry
    s.goto(99)
    assert s.z == 34
    s.goto(10)
    s.click(17, 25)
    s.click(5, 5, "negative")
    s.goto(20)
    s.click(12, 30, "box")
    s.click(24, 18, "box")
    assert s.predictor.encoder_calls == 2  # one per slice
    assert sorted(s.prompts) == [10, 20] and s.masks[[10, 20]].any(axis=(1, 2)).all()
    assert not np.delete(s.masks, [10, 20], axis=0).any()

    # a slice's mask is Predictor's on that slice, through the whole volume's intensity mapping
    from samed2_kit.volume.propagate import volume_intensity

    ref = Predictor(tiny_model)
    ref.set_image(volume_intensity(s.opened.volume.array, s.modality, None)(20), "2d")
    box, _, _ = ref.predict(box=[12, 18, 24, 30], multimask_output=False)
    assert np.array_equal(s.masks[20], box[0])

    want = {"slices": {"10": {"points": [[17.0, 25.0], [5.0, 5.0]], "labels": [1, 0]},
                       "20": {"box": [12.0, 18.0, 24.0, 30.0]}}}  # fmt: skip
    assert s.prompts_json() == want
    read = read_prompts(s.write("prompts", tmp_path / "out"))["slices"]
    assert sorted(read) == [10, 20] and np.allclose(read[20].box, [12, 18, 24, 30])
    assert np.allclose(read[10].points, [[17, 25], [5, 5]]) and read[10].labels.tolist() == [1, 0]

    # NIfTI: (X, Y, Z) like the input, its affine, the masks where they are
    out = s.write("nifti", tmp_path / "out")
    assert out.name == "hippocampus_001_mask.nii.gz"
    img, src = nib.load(out), nib.load(HIPPO)
    assert img.shape == src.shape == (35, 51, 35)
    assert np.allclose(img.affine, src.affine)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0) > 0, s.masks)

    png = s.write("png", tmp_path / "out")  # the current slice
    assert png.name == "hippocampus_001_slice20_mask.png"
    assert np.array_equal(np.asarray(Image.open(png)), s.masks[20].astype(np.uint8) * 255)
    with pytest.raises(ValueError, match="this input is nifti; download NIfTI or PNG"):
        s.write("dicom-seg", tmp_path / "out")
    with pytest.raises(ValueError, match="format 'stl': one of png, nifti, dicom-seg, prompts"):
        s.write("stl", tmp_path / "out")


def test_propagate_equals_propagate_volume_on_the_same_prompts(tiny_model, tmp_path):
    s = Session(Engine.open(tiny_model, backend="torch"), tmp_path / "work")
    s.open(_slab(open_input(HIPPO), 14, 19))  # 5 slices of the real volume
    assert s.shape == (5, 51, 35) and s.opened.geometry
    with pytest.raises(ValueError, match="prompt the object on at least one slice"):
        s.propagate(progress=False)
    s.goto(1)
    s.click(17, 25)
    s.click(5, 45, "negative")
    s.goto(3)
    s.click(12, 18, "box")
    s.click(24, 30, "box")
    s.goto(4)
    s.click(3, 3, "box")  # a box being drawn is not a prompt: left out of the prompts
    s.propagate(progress=False)

    prompts = {1: {"points": [[17, 25], [5, 45]], "labels": [1, 0]}, 3: {"box": [12, 18, 24, 30]}}
    want = propagate_volume(tiny_model, s.opened.volume.array, prompts, modality=s.modality)
    assert s.masks.shape == want.shape == (5, 51, 35) and s.masks.dtype == bool
    assert np.array_equal(s.masks, want) and s.propagated and s.candidates is None
    zs = np.flatnonzero(want.any(axis=(1, 2)))
    assert len(zs) >= 2
    ml = int(want.sum()) * float(np.prod(s.opened.volume.spacing)) / 1000
    assert s.summary().startswith(f"object on {len(zs)} of 5 slices (")
    assert s.summary().endswith(f": {int(want.sum())} voxels, {ml:.2f} ml")


def test_propagate_and_nifti_refuse_a_2d_image(tiny_model, tmp_path):
    s = _session(tiny_model, HC, tmp_path)
    with pytest.raises(ValueError, match="propagation is for volumes: this is a 2D image"):
        s.propagate()
    s.click(400, 270)
    with pytest.raises(ValueError, match="download PNG instead"):
        s.write("nifti", tmp_path / "out")
    with pytest.raises(ValueError, match="this input is image"):
        s.write("dicom-seg", tmp_path / "out")
    png = s.write("png", tmp_path / "out")
    assert png.name == "000_HC_mask.png"
    assert np.array_equal(np.asarray(Image.open(png)) > 0, s.masks[0])
    assert not (tmp_path / "out" / "000_HC_mask.nii.gz").exists()


def test_nothing_opened_is_a_clear_error(tiny_model, tmp_path):
    s = Session(Engine.open(tiny_model, backend="torch"), tmp_path)
    for call in (lambda: s.click(1, 1), s.clear, s.summary, s.prompts_json, s.picture):
        with pytest.raises(ValueError, match="open an image or a volume first"):
            call()


# --- the onnxruntime backend ----------------------------------------------------------------------


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="onnxruntime is not installed (the export extra)",
)
def test_auto_backend_exports_and_clicks_give_the_predictors_masks(tiny_model, tmp_path):
    engine = Engine.open(tiny_model, backend="auto")
    from samed2_kit.deploy.contract import is_export_dir

    assert engine.backend == "onnx" and is_export_dir(engine.export_dir)
    assert "onnxruntime" in engine.describe() and not engine.few_shot
    s = Session(engine, tmp_path)
    s.open(open_input(HC))
    s.click(400, 270)
    s.click(120, 80, "negative")
    assert s.predictor.backend == "onnx" and s.predictor.encoder_calls == 1
    onnx = Predictor(engine.export_dir, backend="onnx")
    onnx.set_image(s.opened.volume.array[0])
    want, _, _ = onnx.predict(point_coords=[[400, 270], [120, 80]], point_labels=[1, 0],
                              multimask_output=False)  # fmt: skip
    assert np.array_equal(s.masks[0], want[0])
    torch_mask, _, _ = _reference(tiny_model, s.opened.volume.array[0]).predict(
        point_coords=[[400, 270], [120, 80]], point_labels=[1, 0], multimask_output=False
    )
    assert (torch_mask[0] != s.masks[0]).mean() < 1e-3  # the same masks as torch (docs/deploy.md)


# --- few-shot -------------------------------------------------------------------------------------


def test_few_shot_needs_a_support_source(tiny_model, tmp_path):
    s = _session(tiny_model, HC, tmp_path)
    image = s.opened.volume.array[0]
    mask = read_volume(HC_MASK, labels=True).array[0] > 0
    with pytest.raises(ValueError, match="hard_prototypes"):
        s.set_support(image, mask)
    with pytest.raises(ValueError, match="set a support image and its mask first"):
        s.segment_few_shot()


def test_few_shot_segments_from_the_support_alone(tiny_model, tmp_path):
    from samed2_kit.model.assemble import add_sources
    from samed2_kit.sources import HardPrototypesConfig

    add_sources(tiny_model, {"hard_prototypes": HardPrototypesConfig()})
    s = _session(tiny_model, HC, tmp_path)
    assert s.engine.few_shot
    image = s.opened.volume.array[0]
    mask = read_volume(HC_MASK, labels=True).array[0] > 0
    assert 0 < mask.sum() < mask.size
    s.set_support(image, mask)
    s.segment_few_shot()

    ref = Predictor(tiny_model)
    ref.set_support([image], [mask], modality="auto")
    ref.set_image(image)
    want, _, _ = ref.predict(multimask_output=False)
    assert np.array_equal(s.masks[0], want[0]) and s.candidates is None
    assert s.prompts == {}  # no prompt was given


# --- the picture ----------------------------------------------------------------------------------


def test_overlay_enlarges_colours_the_mask_and_to_image_inverts(tiny_model, tmp_path):
    s = _session(tiny_model, HIPPO, tmp_path)
    h, w = 51, 35
    f = render.scale_of(h, w)
    assert f == 11 and render.scale_of(540, 800) == 1 and render.scale_of(600, 2000) == 1
    img01 = s._slice01(s.z)
    mask = np.zeros((h, w), bool)
    mask[20:30, 10:18] = True

    plain = render.overlay(img01)
    pic = render.overlay(img01, mask)
    assert pic.shape == (f * h, f * w, 3) and pic.dtype == np.uint8
    grey = np.clip(img01.astype(np.float32) * 255, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[mask] = rgb[mask] * (1 - render.ALPHA) + render.MASK_RGB * render.ALPHA
    want = np.repeat(np.repeat(rgb.astype(np.uint8), f, axis=0), f, axis=1)
    assert np.array_equal(pic, want)  # each image pixel an f x f block, the mask blended in blue
    big = np.repeat(np.repeat(mask, f, axis=0), f, axis=1)
    assert np.array_equal(pic[~big], plain[~big]) and (pic[big] != plain[big]).any(axis=1).all()
    assert (pic[big][:, 2].astype(int) >= plain[big][:, 2]).all()  # bluer

    # markers at the display centre of their pixel; clicks there come back to that pixel
    pts = render.overlay(img01, mask, [[3, 4], [30, 45]], [1, 0], box=[5, 6, 25, 40])
    for (x, y), rgb_want in [((3, 4), render.POSITIVE), ((30, 45), render.NEGATIVE)]:
        xd, yd = x * f + (f - 1) // 2, y * f + (f - 1) // 2
        assert tuple(pts[yd, xd]) == rgb_want
        assert render.to_image(xd, yd, f) == (x, y)
    assert tuple(pts[6 * f + 5, 15 * f]) == render.BOX  # the box's top edge
    for k in (0, 7, 34):
        assert render.to_image(k * f + (f - 1) / 2, 0, f)[0] == pytest.approx(k)
        for xd in range(k * f, (k + 1) * f):  # anywhere on the block rounds to pixel k
            assert round(render.to_image(xd, 0, f)[0]) == k
    assert render.to_image(400, 270, 1) == (400, 270)

    s.goto(20)
    s.click(12, 30, "box")
    assert tuple(s.picture()[30 * f + 5, 12 * f + 5]) == render.BOX  # the corner being drawn
    assert s.picture().shape == (f * h, f * w, 3)


# --- Engine.open and `samed2 app` -----------------------------------------------------------------


def test_engine_open_errors_name_the_path_and_the_fix(tmp_path, tiny_model):
    afile = tmp_path / "model.safetensors"
    afile.write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{afile} is not a folder: pass a run folder")
    ):
        Engine.open(afile)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Engine.open(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty}/model.json not found")):
        Engine.open(empty, backend="torch")
    with pytest.raises(ValueError, match=r"backend='bogus': choose one of \['auto', 'torch'"):
        Engine.open(tiny_model, backend="bogus")
    engine = Engine.open(tiny_model, backend="torch")
    assert engine.backend == "torch" and engine.export_dir is None and engine.image_size == 256


def test_cli_app_errors_return_2_with_a_message(tmp_path, capsys, monkeypatch):
    from samed2_kit.cli import main

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert main(["app", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "samed2 app: error: /nonexistent is not a folder" in err and "Traceback" not in err

    empty = tmp_path / "empty run"
    empty.mkdir()
    assert main(["app", str(empty), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert f"samed2 app: error: {empty}/model.json not found" in err and "Traceback" not in err


def test_prompt_fields_round_and_skip_what_is_not_given():
    sp = SlicePrompt(points=[[1.23456, 2.0]], labels=[1], box=[0.111, 1, 9.999, 8])
    assert sp.fields() == {"box": [0.11, 1.0, 10.0, 8.0], "points": [[1.23, 2.0]], "labels": [1]}
    assert SlicePrompt(corner=[1, 2]).empty() and SlicePrompt(corner=[1, 2]).fields() == {}
    assert json.loads(json.dumps(sp.fields())) == sp.fields()
