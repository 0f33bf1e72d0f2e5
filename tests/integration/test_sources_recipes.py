"""The prompt-source recipes end to end: few-shot training and evaluation by support, and an exact
resume of a run whose similarity prior updates without gradients."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # `samed2 train | eval` in subprocesses


def _train(recipe, store, out, *extra):
    cmd = [sys.executable, "-m", "samed2_kit.cli", "train", str(REPO / "recipes" / recipe),
           "--out", str(out), "data.spec=null", f"data.store={store}", "model.image_size=64",
           "train.batch_size=2", "train.warmup_steps=1", "train.tensorboard=false", *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_few_shot_recipe_trains_by_episodes_and_evaluates_by_support(hc18_store, tmp_path):
    out = tmp_path / "few"
    _train("few_shot.yaml", hc18_store, out, "train.steps=3", "train.save_every=0",
           "train.val_every=0")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["info"]["eval_prompt"] == "support"
    assert metrics["summary"]["overall"]["n"] >= 1
    assert (
        json.loads((out / "model.json").read_text())["sources"]["hard_prototypes"]["kind"]
        == "hard_prototypes"
    )
    for protocol in ("support", "box"):  # few-shot alone, and combined with a box
        r = subprocess.run([sys.executable, "-m", "samed2_kit.cli", "eval", str(out), hc18_store,
                            "--protocol", protocol, "--out", str(tmp_path / protocol)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((tmp_path / "support" / "summary.json").read_text())["overall"]
    assert a["dice"] == metrics["summary"]["overall"]["dice"]  # eval reproduces the run's number


def test_similarity_prior_run_resumes_exactly(hc18_store, tmp_path):
    extra = ["train.steps=8", "train.save_every=4", "train.keep_last=2", "train.val_every=0",
             "sources.similarity_prior.warmup_updates=3", "sources.similarity_prior.slots=4"]  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train("similarity_prior.yaml", hc18_store, whole, *extra)
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000008")  # as if it died after step 4's checkpoint
    (cut / "model.safetensors").unlink()
    r = _train("similarity_prior.yaml", hc18_store, cut, *extra, "--resume")
    assert "resumed from" in r.stdout and "step 4" in r.stdout
    logs = [[json.loads(ln) for ln in (d / "train_log.jsonl").read_text().splitlines()]
            for d in (whole, cut)]  # fmt: skip
    losses = [[(e["step"], e["loss"], e["parts"]) for e in log] for log in logs]
    assert [s for s, _, _ in losses[1]] == list(range(1, 9))
    assert losses[0] == losses[1]  # bit-identical, every step
    a, b = (load_file(str(d / "adapters-default.safetensors")) for d in (whole, cut))
    pool = "prompt_sources.similarity_prior.pool"
    assert pool in a and a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)  # prior buffers and weights, bit-identical
