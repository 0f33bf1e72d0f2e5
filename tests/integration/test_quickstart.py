"""The main job end to end, through the installed `samed2` entry point, with a tiny budget."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SAMED2 = [sys.executable, "-m", "samed2_kit.cli"]

pytestmark = pytest.mark.slow  # `samed2 quickstart | eval` in subprocesses


def _run(args, **kw):
    return subprocess.run(SAMED2 + args, capture_output=True, text=True, timeout=600, **kw)


def test_quickstart_tiny_budget_writes_a_complete_run_folder(tmp_path):
    out = tmp_path / "run"
    r = _run(["quickstart", "--out", str(out), "train.steps=4", "train.batch_size=2",
              "train.warmup_steps=1", "model.image_size=256"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("model.safetensors", "model.json", "metrics.json", "per_case.csv", "report.md",
                 "training_curve.png", "overlays.png"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    overall = metrics["summary"]["overall"]
    rows = list(csv.DictReader((out / "per_case.csv").open()))
    assert overall["n"] == len(rows) > 0
    assert 0.0 <= overall["dice"] <= 1.0 and 0.5 < overall["box_dice"] < 1.0
    assert {r["task"] for r in rows} == {"fetal_head"}
    # held-out subjects never appear in training: the split is by case
    recipe = metrics["recipe"]
    assert recipe["train"]["steps"] == 4
    report = (out / "report.md").read_text()
    assert "box Dice" in report and "training_curve.png" in report
    saved = json.loads((out / "model.json").read_text())
    assert saved["spec"] == {"variant": "test-tiny", "image_size": 256, "clip_len": 1}

    # the run folder evaluates again through `samed2 eval`, with the same numbers
    r = _run(["eval", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "eval-test-box" / "summary.json").read_text())["overall"]
    assert again["dice"] == pytest.approx(overall["dice"], abs=1e-6)


def test_bad_recipe_key_fails_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    r = _run(["quickstart", "--out", str(out), "train.stpes=3"])
    assert r.returncode == 2
    assert "unknown key 'train.stpes'" in r.stderr and "did you mean 'steps'" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_quickstart_from_a_meta_format_checkpoint(tmp_path):
    from samed2_kit.model import build_model
    from samed2_kit.model.build import save_meta_checkpoint

    ckpt = save_meta_checkpoint(build_model("test-tiny", image_size=256).sam, tmp_path / "c.pt")
    out = tmp_path / "run"
    r = _run(["quickstart", "--checkpoint", str(ckpt), "--out", str(out), "train.steps=1",
              "train.batch_size=2", "train.warmup_steps=1"])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from " + str(ckpt) in (out / "report.md").read_text()
    assert Path(out / "model.safetensors").is_file()
