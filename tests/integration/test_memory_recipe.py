"""The memory recipe end to end: train writes the bank, the run folder carries it, eval reads it."""

import subprocess
import sys
from pathlib import Path

import pytest

from samed2_kit.memory import ConfidenceMemory
from samed2_kit.model.assemble import load as load_model

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # `samed2 train | eval | memory` in subprocesses


def test_memory_recipe_saves_the_bank_and_eval_leaves_it_unchanged(hc18_store, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "samed2_kit.cli", "train", str(REPO / "recipes/memory.yaml"),
           "--out", str(out), "data.spec=null", f"data.store={hc18_store}", "model.image_size=64",
           "train.steps=3", "train.batch_size=2", "train.warmup_steps=1", "train.save_every=3",
           "train.val_every=0", "train.tensorboard=false", "memory.threshold=0.0",
           "memory.capacity=4"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    bank = ConfidenceMemory.load(out / "memory.safetensors")
    assert len(bank) == 4  # 3 steps x 2 images, capacity 4
    ckpt_bank = ConfidenceMemory.load(out / "checkpoints" / "step-000003" / "memory.safetensors")
    assert ckpt_bank.digest() == bank.digest()
    model = load_model(out)
    assert model.memory.bank.digest() == bank.digest() and not model.memory.writing

    r = subprocess.run([sys.executable, "-m", "samed2_kit.cli", "eval", str(out), hc18_store,
                        "--protocol", "box+clicks", "--clicks", "2"], capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert ConfidenceMemory.load(out / "memory.safetensors").digest() == bank.digest()
    r = subprocess.run([sys.executable, "-m", "samed2_kit.cli", "memory", "info", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "| fetal_head | 4 | 4 |" in r.stdout
