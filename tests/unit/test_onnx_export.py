"""ONNX export (`samed2 export`, `samed2_kit.deploy`) and the onnxruntime Predictor backend:
parity with torch (low-res logits within 1e-4, the same masks away from the threshold), a model
with temporal adapters + LoRA + a similarity prior, the manifest and its digests, the errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from samed2_kit.cli import main
from samed2_kit.deploy import runtime
from samed2_kit.deploy.export import at_image_size, export_onnx, propagation_graphs
from samed2_kit.deploy.runtime import OnnxModel, select_masks
from samed2_kit.model import build_model
from samed2_kit.model.predictor import Predictor

pytest.importorskip("onnx")  # the `export` extra (scripts/install.sh installs it)
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samed2_kit" / "sample_data" / "hc18" / "images" / "000_HC.png"
LOGIT_TOL = 1e-4  # max |low-res logit difference| asserted (the issue allows 1e-3; ~3e-7 seen)
NEAR = 1e-4  # full-size pixels whose torch logit is this close to the threshold may flip


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE))  # (540, 800) uint8, fetal head ultrasound


def _prompts(hw: tuple[int, int], low: np.ndarray) -> dict[str, dict]:
    """Every kind of prompt on an (H, W) image; `low`: a (1, S/4, S/4) mask_input."""
    h, w = hw
    box = [0.3 * w, 0.25 * h, 0.7 * w, 0.75 * h]
    clicks = {"point_coords": [[0.5 * w, 0.5 * h], [0.1 * w, 0.1 * h]], "point_labels": [1, 0]}
    return {
        "box": {"box": box},
        "points": clicks,
        "box+points": {"box": box, **clicks},
        "boxes": {"box": [box, [10, 10, 0.4 * w, 0.4 * h]]},
        "mask": {"mask_input": low},
        "points+mask": {**clicks, "mask_input": low},
    }


def _compare(torch_pred, onnx_pred, kw: dict) -> float:
    """Both backends on one prompt: the max |low-res logit difference|; asserts the scores match
    and the thresholded masks (what predict returns without return_logits: logits > 0) are
    identical except where the torch logit is within NEAR of the threshold (random-weight
    models put many pixels there; ~1 in 10^6 flips, docs/deploy.md)."""
    a_logits, a_scores, a_low = torch_pred.predict(return_logits=True, **kw)
    b_logits, b_scores, b_low = onnx_pred.predict(return_logits=True, **kw)
    assert a_low.shape == b_low.shape and a_scores.shape == b_scores.shape
    np.testing.assert_allclose(b_scores, a_scores, atol=LOGIT_TOL)
    diff = float(np.abs(a_low - b_low).max())
    assert diff <= LOGIT_TOL, diff
    flipped = (a_logits > 0) != (b_logits > 0)
    assert not (flipped & (np.abs(a_logits) > NEAR)).any()
    return diff


def _parity(model, export_dir, image, kinds=None, **set_kw) -> float:
    """`_compare` on the prompts of `_prompts` (those named in `kinds`, default all), with one
    and with three masks; the worst |low-res logit difference|."""
    torch_pred, onnx_pred = Predictor(model), Predictor(export_dir, backend="onnx")
    torch_pred.set_image(image, **set_kw)
    onnx_pred.set_image(image, **set_kw)
    _, _, low = torch_pred.predict(point_coords=[[400, 270]], multimask_output=False)
    prompts = _prompts(image.shape[:2], low)
    worst = 0.0
    for name in kinds or prompts:
        for multimask in (True, False):
            kw = {**prompts[name], "multimask_output": multimask}
            worst = max(worst, _compare(torch_pred, onnx_pred, kw))
    return worst


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """(test-tiny at 256 px seed 0, its export folder)."""
    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256).eval()
    out = export_onnx(model, tmp_path_factory.mktemp("onnx") / "plain", propagation=False)
    return model, out


def _adapted_model():
    """test-tiny at 256 px, clip_len 3, with temporal adapters, LoRA and a filled similarity
    prior with DS-GIM (gates open, the zero-initialised weights random so that every part
    changes the output), and a hard-prototypes source (few-shot: left out of the export)."""
    from samed2_kit.adapters.lora import LoraSpec
    from samed2_kit.adapters.temporal import TemporalAdapterConfig
    from samed2_kit.model.assemble import add_sources
    from samed2_kit.sources import HardPrototypesConfig, SimilarityPriorConfig

    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256, clip_len=3)
    model.add_adapter("temporal", TemporalAdapterConfig(rank=4))
    model.add_adapter("lora", LoraSpec(preset="all-linear", rank=4))
    prior_cfg = SimilarityPriorConfig(slots=4, dim=8, warmup_updates=0, dsgim=True)
    add_sources(model, {"similarity_prior": prior_cfg, "hard_prototypes": HardPrototypesConfig()},
                ["head"])  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "temporal_adapter.up" in name or "lora_B" in name or "dsgim.block.4" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        for g in model.source_gates.values():
            g.fill_(1.0)
        prior = model.prompt_sources["similarity_prior"]
        x = torch.randn(2, 3, 256, 256, generator=gen)
        gt = torch.zeros(2, 1, 256, 256)
        gt[:, :, 80:170, 60:200] = 1
        prior.train()
        prior.commit([prior.rows_from(model.encode(x), gt, {"task": ["head", "head"]})], 1.0)
    assert int(prior.filled.sum()) > 0
    return model.eval()


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    model = _adapted_model()
    out = export_onnx(model, tmp_path_factory.mktemp("onnx") / "adapted", propagation=False)
    return model, out


def test_parity_test_tiny_256(plain, image):
    model, out = plain
    assert _parity(model, out, image) <= LOGIT_TOL
    pred = Predictor(out, backend="onnx")
    pred.set_image(image)
    box = [200, 100, 600, 400]
    masks, scores, low = pred.predict(box=box, multimask_output=True)
    logits, scores2, low2 = pred.predict(box=box, multimask_output=True, return_logits=True)
    assert masks.dtype == bool and np.array_equal(masks, logits > 0)
    assert np.array_equal(scores, scores2) and np.array_equal(low, low2)
    assert masks.shape == (3, *image.shape) and low.shape == (3, 64, 64)


def test_manifest_describes_graphs_and_preprocessing(plain):
    model, out = plain
    assert sorted(p.name for p in out.iterdir()) == [
        "image_encoder.onnx", "manifest.json", "prompt_decoder.onnx"]  # fmt: skip
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["format"] == "samed2-onnx" and meta["format_version"] == 1
    assert meta["spec"] == {"variant": "test-tiny", "image_size": 256, "clip_len": 1}
    dec = meta["graphs"]["prompt_decoder"]
    shapes = {i["name"]: i["shape"] for i in dec["inputs"]}
    assert shapes["point_coords"] == [1, "num_points", 2] and shapes["mask_input"] == [1, 1, 64, 64]
    assert {o["name"]: o["shape"] for o in dec["outputs"]}["low_res_masks"] == [1, 4, 64, 64]
    enc = meta["graphs"]["image_encoder"]
    assert enc["inputs"] == [{"name": "image", "shape": [1, 3, 256, 256], "dtype": "float32"}]
    assert [o["shape"] for o in enc["outputs"]][0] == [1, 64, 16, 16]
    pre = meta["preprocessing"]
    assert pre["image_size"] == 256 and pre["mean"] == [0.485, 0.456, 0.406]
    assert set(pre["intensity"]) == {"ct", "mr", "2d", "auto"}
    assert meta["decoder"]["dynamic_multimask_via_stability"] is True
    assert meta["source_run"] is None


def test_single_mask_selection_reproduces_sam2_fallback():
    """select_masks on all four outputs == sam2's decoder choosing in torch (stable and unstable
    single masks, multimask)."""
    torch.manual_seed(0)
    dec = build_model("test-tiny", image_size=256).sam.sam_mask_decoder.eval()
    logits = torch.randn(4, 4, 64, 64) * 3
    logits[0, 0] = 10.0  # stable single mask
    logits[1, 0] = torch.randn(64, 64) * 0.04  # unstable: every pixel near 0
    logits[2, 0] = -10.0  # empty: area 0 -> stable
    iou = torch.rand(4, 4)
    settings = json.loads(json.dumps({"multimask": [1, 4], "single_mask": 0,
                                      "dynamic_multimask_via_stability": True,
                                      "stability_delta": 0.05, "stability_thresh": 0.98}))  # fmt: skip
    want_l, want_i = dec._dynamic_multimask_via_stability(logits, iou)
    got_l, got_i = select_masks(logits.numpy(), iou.numpy(), False, settings)
    assert np.array_equal(got_l, want_l.numpy()) and np.array_equal(got_i, want_i.numpy())
    assert not np.array_equal(got_l[1], logits[1, :1].numpy())  # the fallback did happen
    got_l, got_i = select_masks(logits.numpy(), iou.numpy(), True, settings)
    assert np.array_equal(got_l, logits[:, 1:].numpy())


def test_adapters_lora_and_similarity_prior(adapted, image):
    from samed2_kit.adapters import lora

    model, out = adapted
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["graphs"]["image_encoder_clip"]["clip_len"] == 3
    assert meta["graphs"]["image_encoder_clip"]["inputs"][0]["shape"] == [3, 3, 256, 256]
    assert meta["model"]["sources"] == {"similarity_prior": "similarity_prior"}
    assert "hard_prototypes" in meta["model"]["sources_left_out"]
    assert meta["model"]["lora_merged"] == "default" and "temporal" in meta["model"]["adapters"]
    # the exported model was a merged copy: the model keeps its unmerged LoRA
    assert lora.lora_sets(model) == ["default"] and not lora.is_merged(model)
    kinds = ("box+points", "points+mask")
    assert _parity(model, out, image, kinds) <= LOGIT_TOL  # clip encoder, the image repeated
    rng = np.random.default_rng(0)
    neighbors = np.stack([np.clip(image.astype(int) + rng.integers(-20, 20, image.shape), 0, 255)
                          .astype(np.uint8) for _ in range(3)])  # fmt: skip
    neighbors[1] = image
    assert _parity(model, out, image, ("box",), neighbors=neighbors) <= LOGIT_TOL
    # rebuilt at another size: the same tensors (adapters, LoRA sets, prior, gates)
    small = at_image_size(model, 128)
    assert small.image_size == 128 and lora.lora_sets(small) == ["default"]
    theirs = small.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    # the 2D encoder (temporal adapters at T = 1) against the torch model at clip_len 1
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.encode(x, clip_len=1)
    got = OnnxModel(out).encode(x.numpy())
    assert np.abs(got["image_embed"] - want.image_embed.numpy()).max() <= LOGIT_TOL
    assert np.abs(got["high_res_0"] - want.high_res[0].numpy()).max() <= LOGIT_TOL


def test_onnx_backend_has_no_few_shot_path(adapted, image):
    pred = Predictor(adapted[1], backend="onnx")
    mask = np.zeros(image.shape, bool)
    mask[100:300, 200:500] = True
    with pytest.raises(ValueError, match="set_support is not available with backend='onnx'"):
        pred.set_support(image, mask)
    with pytest.raises(ValueError, match="at least one prompt"):
        pred.set_image(image)
        pred.predict()


def test_a_model_given_to_the_onnx_backend_is_exported_on_the_fly(plain, image):
    model, _ = plain
    pred = Predictor(model, backend="onnx")
    folder = pred.onnx.folder
    assert (folder / "manifest.json").is_file() and pred.model is None
    pred.set_image(image)
    masks, scores, low = pred.predict(box=[200, 100, 600, 400], multimask_output=False)
    assert masks.shape == (1, *image.shape) and scores.shape == (1,) and low.shape == (1, 64, 64)
    del pred
    import gc

    gc.collect()
    assert not folder.exists()  # the temporary export went with the predictor


def test_export_at_another_image_size(plain, tmp_path, image):
    model, _ = plain
    out = export_onnx(model, tmp_path / "e128", image_size=128, propagation=False)
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["spec"]["image_size"] == 128 and meta["trained_image_size"] == 256
    small = at_image_size(model, 128).eval()
    assert _parity(small, out, image, ("box", "points+mask")) <= LOGIT_TOL
    with pytest.raises(ValueError, match="multiple of 32"):
        export_onnx(model, tmp_path / "bad", image_size=100)
    with pytest.raises(ValueError, match="opset=9"):
        export_onnx(model, tmp_path / "bad", opset=9)
    assert not (tmp_path / "bad").exists()


def test_damaged_or_mixed_export_folders_are_refused(plain, adapted, tmp_path):
    src = plain[1]
    folder = tmp_path / "copy"
    shutil.copytree(src, folder)
    OnnxModel(folder)  # intact
    shutil.copy(adapted[1] / "prompt_decoder.onnx", folder / "prompt_decoder.onnx")
    with pytest.raises(ValueError, match=r"prompt_decoder\.onnx does not match .*manifest\.json "
                       r".*another export or model.*samed2 export RUN --out DIR"):  # fmt: skip
        OnnxModel(folder)
    with pytest.raises(ValueError, match="does not match"):
        Predictor(folder, backend="onnx")
    (folder / "prompt_decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"prompt_decoder\.onnx is missing.*re-export"):
        OnnxModel(folder)
    meta = json.loads((src / "manifest.json").read_text())
    shutil.copy(src / "prompt_decoder.onnx", folder / "prompt_decoder.onnx")
    (folder / "manifest.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99.*upgrade samed2-kit"):
        OnnxModel(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OnnxModel(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not an export folder"):
        OnnxModel(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OnnxModel(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="backend='torch'\\) takes a SAMed2Model"):
        Predictor(src, backend="torch")
    with pytest.raises(ValueError, match="backend='tflite'"):
        Predictor(src, backend="tflite")


def test_missing_onnxruntime_or_onnx_names_the_extra(plain, tmp_path, monkeypatch):
    model, out = plain
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(ImportError, match=r"onnxruntime is not installed.*samed2-kit\[export\]"):
        OnnxModel(out)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[export\]"'):
        Predictor(out, backend="onnx")
    with pytest.raises(ImportError, match="onnxruntime is not installed"):
        Predictor(model, backend="onnx")  # refused before exporting anything
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"onnx is not installed.*samed2-kit\[export\]"):
        export_onnx(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_the_package_imports_without_onnx_and_onnxruntime():
    code = (
        "import sys\n"
        "sys.modules['onnx'] = sys.modules['onnxruntime'] = None\n"
        "import samed2_kit.deploy.export, samed2_kit.deploy.runtime, samed2_kit.deploy.graphs\n"
        "import samed2_kit.model.predictor, samed2_kit.cli\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_propagation_graphs_join_the_manifest(plain, tmp_path, monkeypatch):
    """The hook: a module's `export_propagation(model, folder, image_size, opset)` entries are
    added to the manifest with their digests, and checked like the other graphs."""
    (tmp_path / "fake_propagation.py").write_text(
        "import torch\n"
        "def export_propagation(model, folder, image_size, opset):\n"
        "    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),),\n"
        "                      str(folder / 'memory_encoder.onnx'), dynamo=False,\n"
        "                      opset_version=opset, input_names=['x'], output_names=['y'])\n"
        "    return {'memory_encoder': {'file': 'memory_encoder.onnx', 'size': image_size}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("samed2_kit.deploy.export.PROPAGATION_MODULE", "fake_propagation")
    out = export_onnx(plain[0], tmp_path / "e")
    entry = json.loads((out / "manifest.json").read_text())["graphs"]["memory_encoder"]
    assert entry["size"] == 256 and len(entry["sha256"]) == 64 and entry["inputs"][0]["name"] == "x"
    assert "memory_encoder" in OnnxModel(out).graphs
    (out / "memory_encoder.onnx").write_bytes(b"other")
    with pytest.raises(ValueError, match=r"memory_encoder\.onnx does not match"):
        OnnxModel(out)
    monkeypatch.setattr("samed2_kit.deploy.export.PROPAGATION_MODULE", "no_such_module_here")
    assert propagation_graphs(plain[0], tmp_path, 256, 17) == {}  # absent: none, no error


@pytest.fixture(scope="module")
def run_dir(plain, tmp_path_factory):
    from samed2_kit.model.assemble import save

    return save(plain[0], tmp_path_factory.mktemp("run") / "run")


def test_cli_export_writes_a_checked_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    onnx = OnnxModel(out)  # every graph listed (the propagation graphs too) is present and intact
    meta = onnx.manifest
    assert meta["source_run"]["model_json_sha256"] == runtime_sha(run_dir / "model.json")
    assert {"image_encoder", "prompt_decoder"} <= set(onnx.graphs)
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(out), "--overwrite", "--opset", "18"]) == 0
    assert OnnxModel(out).manifest["opset"] == 18


def runtime_sha(path: Path) -> str:
    from samed2_kit.utils.atomic import sha256_file

    return sha256_file(path)


def test_cli_export_bad_input_exits_2(run_dir, tmp_path, capsys):
    def fails(args: list[str], message: str) -> None:
        assert main(["export", *args]) == 2
        assert message in capsys.readouterr().err

    out = str(tmp_path / "out")
    fails([str(tmp_path), "--out", out], "model.json not found")
    newer = tmp_path / "newer"
    shutil.copytree(run_dir, newer)
    meta = json.loads((newer / "model.json").read_text())
    (newer / "model.json").write_text(json.dumps({**meta, "format_version": 99}))
    fails([str(newer), "--out", out], "upgrade samed2-kit")
    fails(
        [str(run_dir), "--out", out, "--image-size", "100"],
        "--image-size=100: use a multiple of 32",
    )
    fails([str(run_dir), "--out", out, "--opset", "9"], "opset=9")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    fails([str(run_dir), "--out", str(busy)], "is not an export folder")
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as e:
        main(["export", str(run_dir), "--out", out, "--format", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.parametrize("size", [256, pytest.param(1024, marks=pytest.mark.slow)])
def test_parity_tiny(size, image, tmp_path):
    """Meta's `tiny` architecture (random weights, seed 0), on 2 CPU cores: ~4 s at 256 px,
    ~11 s at 1024 px (slow tier; about 3x that on a busy machine)."""
    torch.manual_seed(0)
    model = build_model("tiny", image_size=size).eval()
    out = export_onnx(model, tmp_path / f"tiny{size}", propagation=False)
    assert _parity(model, out, image) <= LOGIT_TOL


def test_runtime_prompt_layout_follows_sam2():
    xy, lab = runtime.prompt_arrays(np.array([[5.0, 6.0]]), np.array([1]), np.array([1, 2, 3, 4.0]))
    assert xy.shape == (1, 4, 2) and lab.tolist() == [[2, 3, 1, -1]]
    assert xy[0, :2].tolist() == [[1, 2], [3, 4]] and xy[0, 3].tolist() == [0, 0]
    xy, lab = runtime.prompt_arrays()
    assert xy.shape == (1, 0, 2) and lab.shape == (1, 0)


def test_what_cannot_be_exported_is_named(tmp_path):
    from types import SimpleNamespace

    from torch import nn

    from samed2_kit.types import PromptContribution

    class MemorySource(nn.Module):
        def forward(self, feats, prompts, ctx):
            b, _, h, w = feats.image_embed.shape
            return PromptContribution(memory=feats.image_embed.new_zeros(b, 1, 32, h, w))

    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=128).eval()
    model.add_prompt_source("retrieval", MemorySource())
    with pytest.raises(
        ValueError, match="prompt source 'retrieval'.*memory entries.*backend='torch'"
    ):
        export_onnx(model, tmp_path / "e")
    model = build_model("test-tiny", image_size=128).eval()
    model.memory = SimpleNamespace(bank=[0, 1, 2])  # a confidence memory holding 3 entries
    with pytest.raises(ValueError, match="confidence memory with 3 entries.*backend='torch'"):
        export_onnx(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_auto_backend_and_predict_on_an_export_folder(run_dir, tmp_path, capsys):
    """backend="auto": an export folder runs on onnxruntime, a run folder loads into torch; the
    two agree; `samed2 predict` takes either folder and writes the same mask (2D and a volume)."""
    from samed2_kit.medbank.io import read_volume

    out = tmp_path / "onnx"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    by_export, by_run = Predictor(out), Predictor(run_dir)
    assert (by_export.backend, by_run.backend) == ("onnx", "torch")
    img = np.zeros((48, 64), np.uint8)
    img[10:30, 15:45] = 200
    for pred in (by_export, by_run):
        pred.set_image(img, modality="2d")
    box = np.array([15, 10, 44, 29])
    _, _, low_onnx = by_export.predict(box=box, multimask_output=False)
    _, _, low_torch = by_run.predict(box=box, multimask_output=False)
    assert np.abs(low_onnx - low_torch).max() < 1e-4
    png = tmp_path / "img.png"
    cv2.imwrite(str(png), img)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"box": box.tolist()}))
    masks = {}
    for name, weights in (("onnx", out), ("torch", run_dir)):
        target = tmp_path / f"{name}.png"
        assert main(["predict", str(weights), str(png), "--prompts", str(prompts),
                     "--out", str(target)]) == 0  # fmt: skip
        masks[name] = read_volume(target).array
    assert (masks["onnx"] == masks["torch"]).mean() > 0.999
    vol = REPO / "samed2_kit" / "sample_data" / "pyradiomics_brain" / "brain1_image.nrrd"
    prompts.write_text(json.dumps({"slices": {"12": {"box": [100, 100, 140, 140]}}}))
    for name, weights in (("onnx", out), ("torch", run_dir)):
        target = tmp_path / f"{name}.nii.gz"
        assert main(["predict", str(weights), str(vol), "--prompts", str(prompts),
                     "--out", str(target), "--modality", "mr"]) == 0  # fmt: skip
        masks[name] = read_volume(target, labels=True).array
    assert (masks["onnx"] == masks["torch"]).mean() > 0.999
