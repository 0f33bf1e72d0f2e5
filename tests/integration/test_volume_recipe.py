"""recipes/volume_propagation.yaml end to end at a tiny budget: the bundled hippocampus volumes,
sequence training, `slice-box` evaluation in 3D against the extruded box, then `samed2 eval`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_volume_recipe_trains_sequences_and_evaluates_volumes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "samed2_kit.cli", "train", str(REPO / "recipes/volume_propagation.yaml"),
           "--out", str(out), "train.steps=6", "train.save_every=3", "train.log_every=3"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["eval_prompt"] == "slice-box"
    overall = metrics["summary"]["overall"]
    assert overall["n"] == 10 and 0 <= overall["dice"] <= 1 and 0 < overall["box_dice"] < 1
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["recipe"]["train"]["step"] == "sequence"
    ev = [sys.executable, "-m", "samed2_kit.cli", "eval", str(out), "--protocol", "slice-box",
          "--out", str(tmp_path / "eval")]  # fmt: skip
    subprocess.run(ev, check=True, cwd=tmp_path)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["overall"]["dice"] == pytest.approx(overall["dice"])
