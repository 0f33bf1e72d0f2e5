"""recipes/temporal_adapter.yaml end to end: runs of 6 slices of the bundled hippocampus volumes,
the encoder on clips of 3 with temporal adapters, adapter checkpoint in the run folder, 3D
evaluation, re-evaluated by `samed2 eval`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMED2 = [sys.executable, "-m", "samed2_kit.cli"]

pytestmark = pytest.mark.slow  # `samed2 train | eval` in subprocesses


def test_temporal_recipe_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(
        SAMED2 + ["train", str(REPO / "recipes" / "temporal_adapter.yaml"), "--out", str(out),
                  "train.steps=2", "train.warmup_steps=1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "adapters-default.json").read_text())
    assert meta["variant"] == "test-tiny" and meta["base_hash"].startswith("sha256:")
    assert (out / "adapters-default.safetensors").is_file()
    from safetensors.torch import load_file

    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("temporal_adapter" in k or "lora_" in k or "base_layer" in k for k in keys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["per_task"].keys() == {"hippocampus"}
    assert json.loads((out / "model.json").read_text())["spec"]["clip_len"] == 3
    r = subprocess.run(SAMED2 + ["eval", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((out / "eval-test-slice-box" / "summary.json").read_text())["overall"][
        "dice"
    ]
    assert again == pytest.approx(metrics["summary"]["overall"]["dice"], abs=1e-6)
