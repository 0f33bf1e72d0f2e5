"""`samed2 eval` in one process and under `accelerate launch` with two CPU processes (gloo): the
same rows, each sample once, in the same order, written once by the main process."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
LAUNCH = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
# one thread in both runs, so that both compute the same floating-point sums
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow  # `samed2 eval` in subprocesses, under `accelerate launch` too


@pytest.fixture
def run_folder(tmp_path):
    from samed2_kit.config import load_recipe, to_dict
    from samed2_kit.model import build_model
    from samed2_kit.model.assemble import save as save_model

    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256)
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    return save_model(model, tmp_path / "run", {"recipe": to_dict(recipe)})


def _eval(launcher: list[str], run: Path, store: str, out: Path):
    args = ["-m", "samed2_kit.cli", "eval", str(run), store, "--split", "train",
            "--protocol", "box+clicks", "--clicks", "2", "--out", str(out)]  # fmt: skip
    r = subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("eval written to") == 1  # only the main process writes
    assert sorted(p.name for p in out.iterdir()) == [
        "click_curve.png", "per_case.csv", "summary.json", "summary.md"
    ]  # fmt: skip
    return list(csv.DictReader((out / "per_case.csv").open())), r.stdout


def test_one_and_two_processes_give_the_same_rows(run_folder, hc18_store, tmp_path):
    from samed2_kit.engine.items import items_from_store

    expected = [it.sample_id for it in items_from_store(hc18_store, "train")]
    one, _ = _eval([sys.executable], run_folder, hc18_store, tmp_path / "one")
    two, stdout = _eval(LAUNCH, run_folder, hc18_store, tmp_path / "two")
    assert "2 process(es)" in stdout
    assert [r["sample_id"] for r in one] == [r["sample_id"] for r in two] == expected
    for a, b in zip(one, two, strict=True):
        assert float(a["dice"]) == pytest.approx(float(b["dice"]), abs=1e-6)
        assert len(a["click_dice"].split(";")) == 3
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["overall"]["n"] == len(expected) and summary["info"]["processes"] == 2
    assert len(summary["overall"]["click_dice"]) == 3


def test_eval_errors_name_the_fix(run_folder, hc18_store, tmp_path):
    cmd = [sys.executable, "-m", "samed2_kit.cli", "eval", str(run_folder), hc18_store]
    r = subprocess.run(cmd + ["--split", "valid"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "its splits are test, train, val" in r.stderr
    r = subprocess.run(cmd + ["eval.clicks=99"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "eval.clicks=99" in r.stderr
    assert not (run_folder / "eval-valid-box").exists()
