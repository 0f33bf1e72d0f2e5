"""Continual training: two stages (ultrasound, then CT) with replay and one LoRA set per stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from samed2_kit.adapters.freeze import matching
from samed2_kit.adapters.lora import LoraSpec, inject_lora
from samed2_kit.engine.continual import adapter_pattern
from samed2_kit.memory import ConfidenceMemory
from samed2_kit.model import build_model

REPO = Path(__file__).resolve().parents[2]


def test_adapter_pattern_selects_one_set():
    model = build_model("test-tiny", image_size=64)
    for name in ("us", "ct"):
        inject_lora(model, LoraSpec(preset="encoder-attn", rank=2), adapter_name=name)
    us, ct = matching(model, adapter_pattern("us")), matching(model, adapter_pattern("ct"))
    assert us and len(us) == len(ct) and not set(us) & set(ct)
    assert all(".us." in n for n in us)


def _run(out, *extra):
    cmd = [sys.executable, "-m", "samed2_kit.cli", "train",
           str(REPO / "recipes/continual_new_modality.yaml"), "--out", str(out),
           "model.image_size=64", "train.batch_size=2", "train.warmup_steps=1",
           "train.save_every=2", "train.val_every=2", "train.tensorboard=false",
           "eval.max_items=3", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two `samed2 train` runs in subprocesses
def test_two_stages_report_forgetting_and_gain(tmp_path):
    stages = ("continual={stages: [{name: us, tasks: [fetal_head], steps: 3},"
              " {name: ct, tasks: [abdomen_ct_organs], steps: 3, replay: 4}]}")  # fmt: skip
    memory = "memory={threshold: 0.0, capacity: 3, top_k: 2}"
    r = _run(tmp_path / "run", stages, memory)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert [row["after"] for row in result["matrix"]] == ["start", "us", "ct"]
    # one bank across stages: the ultrasound partition survives the CT stage
    bank = ConfidenceMemory.load(tmp_path / "run" / "memory.safetensors")
    assert {r["partition"]: r["entries"] for r in bank.table()} == {
        "fetal_head": 3,
        "abdomen_ct_organs": 3,
    }
    f = result["forgetting"]["us"]
    assert f["forgetting"] == f["dice_after_own_stage"] - f["dice_at_end"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Forgetting and gain" in report and "replays 4 earlier examples" in report
    for stage in ("stage-1-us", "stage-2-ct"):
        assert (tmp_path / "run" / stage / "weights.safetensors").is_file()
        assert (tmp_path / "run" / stage / "checkpoints" / "step-000003").is_dir()
    # stage 2 trained on its 18 CT samples + 4 replayed ultrasound ones
    assert (
        json.loads(
            (
                tmp_path / "run" / "stage-2-ct" / "checkpoints" / "step-000003" / "state.json"
            ).read_text()
        )["meta"]["samples"]
        == 18 + 4
    )

    # resuming a finished run re-uses both stages and gives the same matrix
    r = _run(tmp_path / "run", stages, memory, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert again["matrix"] == result["matrix"]
    assert ConfidenceMemory.load(tmp_path / "run" / "memory.safetensors").digest() == bank.digest()


@pytest.mark.slow  # `samed2 train` in a subprocess
def test_one_adapter_set_per_stage_leaves_the_first_stage_untouched(tmp_path):
    stages = ("continual={stages: [{name: us, tasks: [fetal_head], steps: 3, adapter: us,"
              " trainable: [mask_decoder]}, {name: ct, tasks: [abdomen_ct_organs], steps: 3,"
              " adapter: ct}]}")  # fmt: skip
    lora = "adapters.lora={preset: encoder-attn, rank: 2}"
    r = _run(tmp_path / "run", stages, lora, "memory=null")  # memory would be shared by stages
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "continual.json").read_text())
    # stage 2 trains only its own set, so the ultrasound Dice (with set "us") cannot move
    assert result["forgetting"]["us"]["forgetting"] == 0.0
    meta = json.loads((tmp_path / "run" / "adapters-default.json").read_text())
    assert sorted(meta["adapters"]["lora"]["sets"]) == ["ct", "us"]
