"""docs/examples/onnx_numpy.py: an export folder run with onnxruntime and numpy only. It runs in a
subprocess on the bundled PNG and on a bundled NIfTI volume, never imports torch there, and gives
what the onnx Predictor and `propagate_volume(..., backend="onnx")` give; its torch-free helpers
(`runtime.model_input`, `runtime.upsample_logits`) equal the torch steps they replace."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from samed2_kit.deploy.export import export_onnx  # noqa: E402
from samed2_kit.deploy.runtime import model_input, upsample_logits  # noqa: E402
from samed2_kit.medbank.io import read_volume  # noqa: E402
from samed2_kit.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "onnx_numpy.py"
DATA = REPO / "samed2_kit" / "sample_data"
PNG = DATA / "hc18" / "images" / "000_HC.png"
NII = DATA / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
LABEL = DATA / "msd_hippocampus" / "labels" / "hippocampus_001.nii.gz"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """test-tiny at 256 px (seed 0) exported; its object score says "present" everywhere (an
    untrained one is arbitrary), so propagated slices are not emptied."""
    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256).eval()
    with torch.no_grad():
        model.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(50.0)
    return export_onnx(model, tmp_path_factory.mktemp("example") / "onnx")


def _run(*args) -> str:
    """The example in a fresh interpreter with --check-no-torch (exit 3 if torch was imported)."""
    cmd = [sys.executable, str(EXAMPLE), *map(str, args), "--check-no-torch"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_runtime_helpers_equal_the_torch_steps():
    from samed2_kit.medbank.preprocess import IMAGENET_MEAN, IMAGENET_STD, to_model_input

    rng = np.random.default_rng(0)
    pre = {"image_size": 256, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for shape in ((540, 800), (51, 35), (256, 256), (300, 200, 3)):
        image = rng.random(shape).astype(np.float32)
        rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, 2)
        got = model_input(image, pre)
        assert got.shape == (1, 3, 256, 256) and got.dtype == np.float32
        assert np.abs(got[0] - to_model_input(rgb, 256).numpy()).max() <= 1e-5, shape
    for low, (h, w) in ((64, (540, 800)), (256, (540, 800)), (64, (51, 35)), (64, (64, 64))):
        x = (rng.standard_normal((2, 1, low, low)) * 5).astype(np.float32)
        want = F.interpolate(torch.from_numpy(x), (h, w), mode="bilinear", align_corners=False)
        got = upsample_logits(x, h, w)
        assert got.shape == (2, 1, h, w) and np.abs(got - want.numpy()).max() <= 1e-5


def test_the_example_segments_a_png_without_torch(export_dir, tmp_path):
    from PIL import Image

    from samed2_kit.model.predictor import Predictor

    box = [180, 90, 620, 450]
    out = tmp_path / "mask.png"
    _run(export_dir, PNG, "--box", *box, "--out", out)
    mask = np.asarray(Image.open(out))
    assert mask.shape == (540, 800) and set(np.unique(mask)) <= {0, 255}
    pred = Predictor(export_dir, backend="onnx")
    pred.set_image(np.asarray(Image.open(PNG)))
    want = pred.predict(box=np.array(box, float), multimask_output=False)[0][0]
    assert want.any() and float(((mask > 0) != want).mean()) <= 1e-3


def test_the_example_propagates_a_nifti_volume_without_torch(export_dir, tmp_path):
    from samed2_kit.prompts import Prompt
    from samed2_kit.volume import propagate_volume

    label = read_volume(LABEL, labels=True).array > 0
    zs = np.nonzero(label.any((1, 2)))[0]
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(label[z])
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    out = tmp_path / "mask.nii.gz"
    printed = _run(export_dir, NII, "--box", *box, "--slice", z, "--modality", "mr", "--out", out)
    assert f"box on slice {z}" in printed
    volume = read_volume(NII)
    got = read_volume(out, labels=True)
    assert got.shape_zyx == volume.shape_zyx and np.allclose(got.affine, volume.affine)
    want = propagate_volume(None, volume, {z: Prompt(box=np.array(box, float))}, modality="mr",
                            backend="onnx", export_dir=export_dir)  # fmt: skip
    mask = got.array > 0
    assert mask[z].any() and np.delete(mask, z, 0).any()  # the prompted slice and propagated ones
    assert float((mask != want).mean()) <= 1e-3
