"""`export_onnx(..., quantize="int8")` / `samed2 export --quantize int8`: the image encoder
quantised dynamically, recorded in the manifest, digests of what is written, outputs near fp32."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from samed2_kit.cli import main  # noqa: E402
from samed2_kit.deploy.export import QUANT_SETTINGS, export_onnx  # noqa: E402
from samed2_kit.deploy.runtime import OnnxModel  # noqa: E402
from samed2_kit.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("test-tiny", image_size=256).eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """(fp32 folder, int8 folder) of the same model."""
    root = tmp_path_factory.mktemp("quantize")
    return export_onnx(model, root / "fp32"), export_onnx(model, root / "int8", quantize="int8")


def _manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_int8_export_quantizes_the_encoder_and_records_it(exports):
    import onnx

    fp32, int8 = exports
    assert _manifest(fp32)["quantization"] is None
    meta = _manifest(int8)
    q = meta["quantization"]
    assert q["mode"] == "int8" and q["graphs"] == ["image_encoder"]
    assert {k: q[k] for k in QUANT_SETTINGS} == QUANT_SETTINGS and q["onnxruntime_version"]
    enc = meta["graphs"]["image_encoder"]
    assert enc["quantized"] == "int8" and enc["clip_len"] == 1
    assert enc["inputs"] == _manifest(fp32)["graphs"]["image_encoder"]["inputs"]  # still float32
    ops = {n.op_type for n in onnx.load(str(int8 / enc["file"])).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops
    assert "MatMulInteger" not in {
        n.op_type for n in onnx.load(str(int8 / "prompt_decoder.onnx")).graph.node
    }
    size = {
        f: (d / "image_encoder.onnx").stat().st_size for f, d in (("fp32", fp32), ("int8", int8))
    }
    assert size["int8"] < 0.7 * size["fp32"]
    assert not [p.name for p in int8.iterdir() if p.name.startswith(".")]  # no temporary left


def test_int8_encoder_runs_near_fp32_and_its_digest_is_checked(exports):
    fp32, int8 = exports
    x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
    want, got = OnnxModel(fp32).encode(x), OnnxModel(int8).encode(x)  # digests verified
    for k in ("image_embed", "high_res_0", "high_res_1"):
        assert np.abs(got[k] - want[k]).max() <= 0.1 * np.abs(want[k]).max(), k
    assert np.array_equal(got["pos"], want["pos"])
    path = int8 / "image_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    try:
        with pytest.raises(ValueError, match=r"image_encoder\.onnx does not match"):
            OnnxModel(int8)
    finally:
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    OnnxModel(int8)


def test_bad_quantize_names_the_choices(model, tmp_path):
    with pytest.raises(ValueError, match="quantize='int4': use one of int8, or leave it out"):
        export_onnx(model, tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


def test_cli_export_quantize_int8(model, tmp_path, capsys):
    from samed2_kit.model.assemble import save

    run = save(model, tmp_path / "run")
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--out", str(out), "--quantize", "int8"]) == 0
    assert OnnxModel(out).manifest["quantization"]["mode"] == "int8"
    with pytest.raises(SystemExit) as e:
        main(["export", str(run), "--out", str(tmp_path / "x"), "--quantize", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
