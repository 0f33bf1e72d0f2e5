"""Data order, training checkpoints and exact resume (in process), continual-stage helpers."""

import json
import shutil

import numpy as np
import pytest
import torch

from samed2_kit.config import load_recipe
from samed2_kit.engine import state as ckpt
from samed2_kit.engine.continual import forgetting_table
from samed2_kit.engine.data import GlobalBatches
from samed2_kit.engine.train import train
from samed2_kit.model import build_model


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_global_batches_split_across_ranks_and_resume_mid_stream():
    one = _take(GlobalBatches(10, 4, seed=3), 7)  # 2 batches per epoch: crosses 3 epochs
    r0 = _take(GlobalBatches(10, 2, seed=3, rank=0, world=2), 7)
    r1 = _take(GlobalBatches(10, 2, seed=3, rank=1, world=2), 7)
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    assert [e for e, _ in one[0]] == [0] * 4 and [e for e, _ in one[2]] == [1] * 4
    epoch0 = sorted(i for b in one[:2] for _, i in b)
    assert len(set(epoch0)) == 8  # no sample twice within an epoch (2 dropped)
    assert _take(GlobalBatches(10, 4, seed=3, start=5), 2) == one[5:7]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatches(3, 2, seed=0, world=2)


def _recipe(*extra):
    return load_recipe(
        None,
        ["model.image_size=64", "train.batch_size=2", "train.warmup_steps=1", "train.steps=6",
         "train.save_every=2", "train.keep_last=2", "train.mixed_precision=no",
         "train.tensorboard=false", *extra],
    )  # fmt: skip


def _train(recipe, store, run, resume=False):
    torch.manual_seed(0)
    model = build_model("test-tiny", None, 64)
    if recipe.memory is not None:
        from samed2_kit.memory import attach_memory

        attach_memory(model, recipe.memory)
    model, result, _ = train(recipe, model, store, run, resume=resume, progress=False)
    return model, [h.loss for h in result.history]


def test_resume_in_process_is_exact_and_keeps_the_last_k(hc18_store, tmp_path):
    _, whole = _train(_recipe(), hc18_store, tmp_path / "a")
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "a")] == ["step-000004", "step-000006"]
    # the run as if killed after step 4: its last checkpoint and log lines are gone
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    _, rest = _train(_recipe(), hc18_store, tmp_path / "b", resume=True)
    assert rest == whole[4:]
    log = [json.loads(ln) for ln in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log] == whole


def test_corrupt_or_foreign_checkpoints_are_clear_errors(hc18_store, tmp_path):
    run = tmp_path / "run"
    _train(_recipe("train.steps=2"), hc18_store, run)
    newest = ckpt.checkpoint_dirs(run)[-1]
    with pytest.raises(ValueError, match="train.lr.*different run|different run.*train.lr"):
        _train(_recipe("train.lr=0.5"), hc18_store, run, resume=True)
    with pytest.raises(ValueError, match="trainable|different run"):
        _train(_recipe("train.mode=decoder"), hc18_store, run, resume=True)
    weights = newest / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated file
    with pytest.raises(ValueError, match="weights.safetensors is missing or corrupt"):
        _train(_recipe(), hc18_store, run, resume=True)
    (newest / "state.json").unlink()
    with pytest.raises(ValueError, match="state.json is missing or corrupt"):
        ckpt.read_state(newest)
    # a folder still being written (temp name) is never taken for a checkpoint
    (run / "checkpoints" / ".step-000009.tmp-abc").mkdir()
    assert ckpt.checkpoint_dirs(run) == [newest]
    with pytest.raises(ValueError, match="nothing to resume"):
        _train(_recipe(), hc18_store, tmp_path / "empty", resume=True)


def test_optimizer_and_rng_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    tensors, rest = ckpt.flatten_optimizer(opt.state_dict())
    back = ckpt.unflatten_optimizer(tensors, json.loads(json.dumps(rest)))
    assert torch.equal(back["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    t, r = ckpt.rng_state()
    a = (torch.rand(2), np.random.rand(2))
    ckpt.set_rng_state(t, json.loads(json.dumps(r)))
    b = (torch.rand(2), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_forgetting_and_gain_from_the_dice_matrix():
    matrix = [
        {"after": "start", "dice": {"us": 0.1, "ct": 0.2}},
        {"after": "us", "dice": {"us": 0.9, "ct": 0.25}},
        {"after": "ct", "dice": {"us": 0.7, "ct": 0.8}},
    ]
    f = forgetting_table(matrix, ["us", "ct"])
    assert f["us"]["gain"] == pytest.approx(0.8) and f["us"]["forgetting"] == pytest.approx(0.2)
    assert f["ct"]["gain"] == pytest.approx(0.55) and f["ct"]["forgetting"] == pytest.approx(0.0)


def test_resume_with_a_memory_bank_is_exact(hc18_store, tmp_path):
    recipe = _recipe("memory={threshold: 0.0, capacity: 3, top_k: 2}")
    model, whole = _train(recipe, hc18_store, tmp_path / "a")
    assert (ckpt.checkpoint_dirs(tmp_path / "a")[-1] / "memory.safetensors").is_file()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-000006")
    resumed, rest = _train(recipe, hc18_store, tmp_path / "b", resume=True)
    assert rest == whole[4:]
    assert (
        resumed.memory.bank.digest() == model.memory.bank.digest() and len(model.memory.bank) == 3
    )
