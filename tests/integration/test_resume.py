"""A run killed with SIGKILL and resumed gives the same losses as the uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}

pytestmark = pytest.mark.slow  # `samed2 train` in subprocesses, one killed with SIGKILL


def _cmd(store, out, *extra):
    return [sys.executable, "-m", "samed2_kit.cli", "train", str(REPO / "recipes/quickstart.yaml"),
            "--out", str(out), "data.spec=null", f"data.store={store}", "model.image_size=128",
            "train.steps=16", "train.batch_size=2", "train.warmup_steps=2", "train.save_every=4",
            "train.val_every=4", "train.keep_last=2", "train.tensorboard=false", *extra]  # fmt: skip


def _losses(run):
    lines = (run / "train_log.jsonl").read_text().splitlines()
    entries = [json.loads(ln) for ln in lines]
    return [(e["step"], e["loss"]) for e in entries if "loss" in e], [
        (e["step"], e["val"]) for e in entries if "val" in e
    ]


def test_sigkill_then_resume_continues_exactly(hc18_store, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = subprocess.run(_cmd(hc18_store, whole), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(_cmd(hc18_store, killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000008").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before step 8"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists()  # killed before the end
    saved = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert saved[-1].startswith("step-0000") and len(saved) <= 2, saved  # keep_last=2

    r = subprocess.run(
        _cmd(hc18_store, killed, "--resume"), capture_output=True, text=True, env=ENV
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    loss_a, val_a = _losses(whole)
    loss_b, val_b = _losses(killed)
    assert [s for s, _ in loss_b] == list(range(1, 17))
    assert loss_b == loss_a  # bit-identical floats, every step
    assert val_b == val_a
    a, b = (json.loads((d / "metrics.json").read_text())["summary"] for d in (whole, killed))
    assert a == b


def test_resume_refuses_another_recipe_and_an_existing_folder(hc18_store, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(_cmd(hc18_store, out, "train.steps=4"), capture_output=True, text=True,
                       env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(_cmd(hc18_store, out, "train.steps=4"), capture_output=True, text=True,
                       env=ENV)  # fmt: skip
    assert r.returncode == 2 and "--resume to continue it" in r.stderr
    r = subprocess.run(_cmd(hc18_store, out, "train.lr=0.1", "--resume"), capture_output=True,
                       text=True, env=ENV)  # fmt: skip
    assert r.returncode == 2 and "train.lr" in r.stderr and "different run" in r.stderr
