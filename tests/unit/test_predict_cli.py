"""`samed2 predict`: prompts files, 2D and volume outputs, and its clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from samed2_kit.cli import main
from samed2_kit.medbank.io import read_volume
from samed2_kit.model.assemble import save as save_model
from samed2_kit.predict import read_prompts

REPO = Path(__file__).resolve().parents[2]
HC18 = REPO / "samed2_kit" / "sample_data" / "hc18"
CT = REPO / "samed2_kit" / "sample_data" / "totalseg" / "example_ct_sm.nii.gz"


@pytest.fixture
def run_dir(tiny_model, tmp_path):
    return save_model(tiny_model, tmp_path / "run", {"recipe": {}})


def _prompts(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_2d_png_mask_from_a_box(run_dir, tmp_path, capsys):
    image = HC18 / "images" / "000_HC.png"
    prompts = _prompts(tmp_path, {"box": [200, 100, 600, 450], "points": [[400, 270]]})
    assert main(["predict", str(run_dir), str(image), "--prompts", prompts, "--out",
                 str(tmp_path / "out")]) == 0  # fmt: skip
    written = tmp_path / "out" / "000_HC_mask.png"
    assert f"wrote {written}" in capsys.readouterr().out
    mask = read_volume(written).array[0]
    assert mask.shape == read_volume(image).array.shape[1:3]
    assert set(np.unique(mask)) <= {0, 255}


def test_volume_to_nifti_in_the_input_geometry(run_dir, tmp_path):
    pytest.importorskip("samed2_kit.volume")
    ref = read_volume(CT)
    z = ref.shape_zyx[0] // 2
    prompts = _prompts(tmp_path, {"slices": {str(z): {"box": [10, 10, 40, 40]}}})
    out = tmp_path / "ct_mask.nii.gz"
    assert main(["predict", str(run_dir), str(CT), "--prompts", prompts, "--out", str(out),
                 "--modality", "ct"]) == 0  # fmt: skip
    back = read_volume(out, labels=True)
    assert back.shape_zyx == ref.shape_zyx
    assert np.allclose(back.affine, ref.affine, atol=1e-4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"box": [1, 2, 3', "not valid JSON: .* at line 1, column"),
        ({"bbox": [1, 2, 3, 4]}, r"unknown keys \['bbox'\]"),
        ({"box": [1, 2, 3]}, "box must be 4 numbers"),
        ({"points": [[1, 2], [3, 4]], "labels": [1]}, "2 points but 1 labels"),
        ({"slices": {"top": {"box": [1, 2, 3, 4]}}}, "slice key 'top' is not a slice number"),
        ({"slices": {}}, '"slices" must map slice numbers'),
        ({}, "give a box and/or points"),
    ],
)
def test_bad_prompts_files_name_the_problem(tmp_path, data, message):
    with pytest.raises(ValueError, match=message):
        read_prompts(_prompts(tmp_path, data))


def test_errors_exit_2_with_the_fix(run_dir, tmp_path, capsys):
    image = str(HC18 / "images" / "000_HC.png")
    outside = _prompts(tmp_path, {"box": [200, 100, 6000, 450]})
    assert main(["predict", str(run_dir), image, "--prompts", outside]) == 2
    assert "lies outside the 800x540" in capsys.readouterr().err
    box = _prompts(tmp_path, {"box": [200, 100, 600, 450]}, "b.json")
    assert main(["predict", str(run_dir), image, "--prompts", box, "--format", "nifti"]) == 2
    assert "has no geometry" in capsys.readouterr().err
    assert main(["predict", str(run_dir), image, "--prompts", box, "--format", "dicom-seg"]) == 2
    assert "references the source DICOM series" in capsys.readouterr().err
    assert main(["predict", str(run_dir), image]) == 2
    assert "needs --prompts" in capsys.readouterr().err
    vol = _prompts(tmp_path, {"slices": {"0": {"box": [1, 1, 5, 5]}}}, "v.json")
    assert main(["predict", str(run_dir), image, "--prompts", vol]) == 2
    assert 'without "slices"' in capsys.readouterr().err
    assert main(["predict", str(run_dir), str(CT), "--prompts", box]) == 2
    assert "the prompts file needs" in capsys.readouterr().err
    assert not list((HC18 / "images").glob("*_mask*"))  # nothing written beside the input


def test_a_volume_is_read_with_the_modality_the_model_trained_on(capsys):
    """`--modality auto` on a NIfTI (no modality in its header) of a model trained on MR only:
    MR's intensity rules, said aloud; anything explicit, DICOM's own modality, 2D images and
    models of several modalities keep what they had."""
    import numpy as np

    from samed2_kit.medbank.io.volume import Volume
    from samed2_kit.predict import volume_modality

    vol = Volume(np.zeros((5, 8, 8), np.float32), (1.0, 1.0, 1.0))
    assert volume_modality(vol, "auto", None, ["mr"]) == "mr"
    assert "intensity: mr" in capsys.readouterr().out
    assert volume_modality(vol, "ct", None, ["mr"]) == "ct"
    assert volume_modality(vol, "auto", (40, 400), ["mr"]) == "auto"
    assert volume_modality(vol, "auto", None, ["mr", "ct"]) == "auto"
    assert volume_modality(vol, "auto", None, ["us"]) == "auto"
    assert volume_modality(vol, "auto", None, []) == "auto"
    dicom = Volume(vol.array, (1.0, 1.0, 1.0), meta={"modality": "CT"})
    assert volume_modality(dicom, "auto", None, ["mr"]) == "auto"
    image = Volume(np.zeros((1, 8, 8), np.float32), (1.0, 1.0, 1.0))
    assert volume_modality(image, "auto", None, ["mr"]) == "auto"


def test_predict_never_replaces_a_file_without_overwrite(run_dir, tmp_path, capsys, monkeypatch):
    """Default output: the current folder (never beside the input); an existing output, or the
    input itself, is replaced only with --overwrite, and the refusal comes before any work."""
    import shutil

    image = tmp_path / "img.png"
    shutil.copy(HC18 / "images" / "000_HC.png", image)
    original = image.read_bytes()
    prompts = _prompts(tmp_path, {"box": [200, 100, 600, 450]})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["predict", str(run_dir), str(image), "--prompts", prompts]) == 0
    written = work / "img_mask.png"
    assert written.is_file() and not (tmp_path / "img_mask.png").exists()
    first = written.read_bytes()
    written.write_bytes(b"keep me")
    assert main(["predict", str(run_dir), str(image), "--prompts", prompts]) == 2
    assert "exists: choose another --out, or pass --overwrite" in capsys.readouterr().err
    assert written.read_bytes() == b"keep me"
    assert main(["predict", str(run_dir), str(image), "--prompts", prompts,
                 "--out", str(image)]) == 2  # fmt: skip
    assert "is the input itself" in capsys.readouterr().err and image.read_bytes() == original
    assert main(["predict", str(run_dir), str(image), "--prompts", prompts, "--overwrite"]) == 0
    assert written.read_bytes() == first
