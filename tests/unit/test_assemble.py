"""`samed2_kit.model.assemble`: one manifest to save and load a model; format-1 folders load."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from samed2_kit.model import build_model
from samed2_kit.model.assemble import load as load_model
from samed2_kit.model.assemble import save as save_model
from samed2_kit.types import Prompts
from samed2_kit.utils.atomic import atomic_path

RUN_V1 = Path(__file__).resolve().parents[1] / "data" / "run_v1"
META = {"task": ["a"], "case_id": ["c9"], "modality": ["mr"]}


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(3)
    m = build_model("test-tiny", image_size=256)
    save_model(m, tmp_path / "run", {"note": "x"})
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["spec"] == {"variant": "test-tiny", "image_size": 256, "clip_len": 1}
    assert meta["format_version"] == 2 and meta["note"] == "x"
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
    (tmp_path / "model.json").write_text(json.dumps({"format_version": 9}))
    with pytest.raises(ValueError, match="upgrade samed2-kit"):
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


def _expected_output(model):
    from safetensors.torch import load_file

    e = load_file(str(RUN_V1 / "expected.safetensors"))
    with torch.no_grad():
        out = model.eval()(e["input"], Prompts(boxes=e["box"]), clip_len=3, meta=META)
    return out, e


def test_a_folder_of_format_1_loads_as_it_was_saved():
    """tests/data/run_v1 was written by the save path before this module (see its README)."""
    model = load_model(RUN_V1)
    assert model.spec.clip_len == 3  # format 1 kept T only in the saved recipe
    from samed2_kit.adapters.lora import lora_sets
    from samed2_kit.adapters.temporal import temporal_config
    from samed2_kit.config import Recipe, from_dict

    assert lora_sets(model) == ["default"] and temporal_config(model)["rank"] == 4
    recipe = from_dict(Recipe, json.loads((RUN_V1 / "model.json").read_text())["recipe"])
    assert sorted(recipe.adapters) == ["lora", "temporal"]  # format 1 wrote nulls for "off"
    assert list(model.prompt_sources) == ["similarity_prior", "hard_prototypes"]
    assert len(model.memory.bank) == 2
    out, e = _expected_output(model)
    assert torch.equal(out.low_res_logits, e["low_res_logits"]) and torch.equal(out.iou, e["iou"])


def test_format_1_folder_saved_again_is_format_2_and_the_same_model(tmp_path):
    model = load_model(RUN_V1)
    save_model(
        model,
        tmp_path / "v2",
        {"recipe": json.loads((RUN_V1 / "model.json").read_text())["recipe"]},
    )
    meta = json.loads((tmp_path / "v2" / "model.json").read_text())
    assert meta["spec"] == {"variant": "test-tiny", "image_size": 64, "clip_len": 3}
    assert meta["adapters"]["temporal"] == {"rank": 4, "kernel": 3, "blocks": [0, 1, 2, 3, 4]}
    assert meta["adapters"]["lora"]["active"] == "default"
    assert meta["sources"]["similarity_prior"]["config"]["classes"] == ["a", "b"]
    assert meta["memory"]["capacity"] == 4 and not (tmp_path / "v2" / "sources.json").exists()
    again = load_model(tmp_path / "v2")
    out, e = _expected_output(again)
    assert torch.equal(out.low_res_logits, e["low_res_logits"])


def test_damaged_weights_are_refused(tmp_path):
    shutil.copytree(RUN_V1, tmp_path / "v1")
    save_model(load_model(tmp_path / "v1"), tmp_path / "v2")
    weights = tmp_path / "v2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_model(tmp_path / "v2")
