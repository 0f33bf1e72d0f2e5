import json

import pytest
import torch

from samed2_kit.engine.checkpoint import load_model, save_model
from samed2_kit.model import build_model
from samed2_kit.utils.atomic import atomic_path


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(3)
    m = build_model("test-tiny", image_size=256)
    save_model(m, tmp_path / "run", {"note": "x"})
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["variant"] == "test-tiny" and meta["image_size"] == 256 and meta["note"] == "x"
    back = load_model(tmp_path / "run")
    assert back.load_report.ok
    for k, v in m.sam.state_dict().items():
        assert torch.equal(v, back.sam.state_dict()[k]), k
    assert load_model(tmp_path / "run" / "model.safetensors").spec == m.spec


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json not found"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"variant": "test-tiny"}))
    with pytest.raises(ValueError, match="lacks the field 'image_size'"):
        load_model(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError), atomic_path(folder, directory=True) as tmp:
        (tmp / "a.txt").write_text("partial")
        raise RuntimeError("crash")
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with atomic_path(folder, directory=True) as tmp:
        (tmp / "a.txt").write_text("done")
    assert (folder / "a.txt").read_text() == "done"
