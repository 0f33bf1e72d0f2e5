"""Damaged and wrong inputs end in one clear error: truncated or altered weights, checkpoints,
adapter files and memory banks (sha256 digests, NaN/inf), random bytes posing as a .pt, bad
overrides, and runs refused before their folder is created; "held-out" only when it is."""

import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from samed2_kit.cli import main
from samed2_kit.config import load_recipe, to_dict
from samed2_kit.engine import report
from samed2_kit.model.assemble import from_recipe
from samed2_kit.model.assemble import load as load_model
from samed2_kit.model.assemble import save as save_model
from samed2_kit.model.build import read_safetensors, read_state_dict
from samed2_kit.utils.atomic import sha256_file
from tests._damage import memory_bank as _memory_bank
from tests._damage import rewrite_safetensors as _rewrite

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "samed2_kit" / "sample_data" / "hc18" / "images" / "000_HC.png"
BASE = ["model.image_size=64", "train.steps=1", "train.batch_size=2", "train.warmup_steps=0",
        "train.tensorboard=false", "train.mixed_precision=no", "eval.max_items=1"]  # fmt: skip


@pytest.fixture(scope="module")
def saved_run(hc18_store, tmp_path_factory):
    """An untrained test-tiny run folder at 64 px whose recipe evaluates on the HC18 store."""
    recipe = load_recipe(None, [*BASE, f"data.store={hc18_store}"])
    torch.manual_seed(0)
    model = from_recipe(recipe, ["fetal_head"])
    return save_model(model, tmp_path_factory.mktemp("saved") / "run", {"recipe": to_dict(recipe)})


def _copy(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def _drop_digests(folder):
    meta = json.loads((folder / "model.json").read_text())
    meta.pop("files")
    (folder / "model.json").write_text(json.dumps(meta))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _clear_error(capsys, *parts):
    """The command's stderr: one error line naming `parts`, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


def _recipe_file(tmp_path, store, *extra):
    path = tmp_path / "recipe.yaml"
    lines = [f"data: {{store: '{store}'}}", *extra]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -- 1/2: weights of a run folder --------------------------------------------------------------
def test_truncated_or_corrupt_weights_in_eval_and_predict(saved_run, tmp_path, capsys):
    cut = _copy(saved_run, tmp_path, "cut")
    _truncate(cut / "model.safetensors")
    assert main(["eval", str(cut)]) == 2  # the digest in model.json catches it
    _clear_error(capsys, "model.safetensors", "sha256")
    _drop_digests(cut)  # a folder without a digest: safetensors' own check, named
    assert main(["eval", str(cut)]) == 2
    _clear_error(capsys, f"{cut / 'model.safetensors'} is truncated or not a safetensors file",
                 "re-copy it")  # fmt: skip
    header = _copy(saved_run, tmp_path, "header")
    _drop_digests(header)
    data = bytearray((header / "model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (header / "model.safetensors").write_bytes(bytes(data))
    prompts = tmp_path / "p.json"
    prompts.write_text('{"box": [200, 100, 600, 450]}')
    argv = ["predict", str(header), str(IMAGE), "--prompts", str(prompts), "--out", str(tmp_path)]
    assert main(argv) == 2
    _clear_error(capsys, "header/model.safetensors is truncated or not a safetensors file")


def test_flipped_bytes_are_caught_by_the_digest_and_no_digest_warns(saved_run, tmp_path, caplog):
    flipped = _copy(saved_run, tmp_path, "flipped")
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-64:-32] = bytes(b ^ 0xFF for b in data[-64:-32])  # same length, other bytes
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*model.json"):
        load_model(flipped)
    with pytest.raises(ValueError, match="sha256 differs"):  # also as a recipe's checkpoint
        read_state_dict(flipped)
    plain = _copy(saved_run, tmp_path, "plain")
    _drop_digests(plain)
    with caplog.at_level(logging.WARNING):
        load_model(plain)
    assert "records no sha256 of model.safetensors" in caplog.text


def test_safetensors_helper_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(10.0)}, str(path))
    assert torch.equal(read_safetensors(path)[0]["a"], torch.arange(10.0))
    for bad in (b"", b"abc", os.urandom(500)):
        path.write_bytes(bad)
        with pytest.raises(
            ValueError, match=r"checkpoint file .*w.safetensors is truncated .*: fix"
        ):
            read_safetensors(path, "fix", "checkpoint file ")
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        read_safetensors(tmp_path / "nothere.safetensors")


def test_damaged_training_checkpoint_adapters_and_stage_weights(tmp_path, tiny_model):
    from samed2_kit.adapters.io import load_adapters, save_adapters
    from samed2_kit.adapters.lora import LoraSpec, inject_lora
    from samed2_kit.engine import state as ckpt
    from samed2_kit.engine.continual import STAGE_EVAL, STAGE_WEIGHTS, load_stage

    # a checkpoint whose file was damaged before its digest was taken (state.json agrees)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = ckpt.save(tmp_path / "run", model, opt, sched, ckpt.Position(1, 1), {},
                       [ckpt.rng_state()])  # fmt: skip
    _truncate(folder / "optimizer.safetensors")
    state = json.loads((folder / "state.json").read_text())
    state["files"]["optimizer.safetensors"] = sha256_file(folder / "optimizer.safetensors")
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"optimizer.safetensors is truncated .*delete"):
        ckpt.load(folder, model, opt, sched)
    # adapter files without a recorded hash
    inject_lora(tiny_model, LoraSpec(preset="encoder-attn", rank=2))
    meta_path = save_adapters(tiny_model, tmp_path / "ad")
    meta = json.loads(meta_path.read_text())
    meta.pop("tensors_sha256")
    meta_path.write_text(json.dumps(meta))
    _truncate(tmp_path / "ad" / "adapters-default.safetensors")
    with pytest.raises(ValueError, match=r"adapter file .*adapters-default.safetensors is trunc"):
        load_adapters(tiny_model, tmp_path / "ad")
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapters-default.json is unreadable or not valid JSON"):
        load_adapters(tiny_model, tmp_path / "ad")
    # a finished continual stage: its weights are checked against eval.json's digest
    stage = tmp_path / "stage-1-a"
    stage.mkdir()
    net = torch.nn.Linear(2, 2)
    net.prompt_sources, net.source_kinds = {}, {}  # what `assemble.load_state` looks at
    save_file(dict(net.state_dict()), str(stage / STAGE_WEIGHTS))
    row = {"after": "a", "dice": {"a": 0.5}}
    files = {STAGE_WEIGHTS: sha256_file(stage / STAGE_WEIGHTS)}
    (stage / STAGE_EVAL).write_text(json.dumps({**row, "files": files}))
    assert load_stage(net, stage) == row
    _truncate(stage / STAGE_WEIGHTS)
    with pytest.raises(ValueError, match=r"stage file .*weights.safetensors is missing or damaged"):
        load_stage(net, stage)
    (stage / STAGE_EVAL).write_text(json.dumps(row))  # written before digests: read, named
    with pytest.raises(ValueError, match=r"stage weights .*weights.safetensors is truncated"):
        load_stage(net, stage)


# -- 3: memory banks, the similarity prior -----------------------------------------------------
def test_memory_bank_digest_and_non_finite_entries(tmp_path, capsys):
    from samed2_kit.memory import ConfidenceMemory, Entry

    path = tmp_path / "memory.safetensors"
    bank = _memory_bank(path)
    assert ConfidenceMemory.load(path).digest() == bank.digest()
    _rewrite(path, "features", lambda t: t.mul_(2))  # same size, other bytes
    with pytest.raises(ValueError, match=r"memory.safetensors is damaged: .*sha256"):
        ConfidenceMemory.load(path)
    _memory_bank(path)
    _rewrite(path, "conf", lambda t: t.fill_(float("nan")), lambda h: h.pop("digest"))
    with pytest.raises(ValueError, match=r"memory.safetensors: conf of 3 entries hold NaN or inf"):
        ConfidenceMemory.load(path)
    assert main(["memory", "info", str(path)]) == 2
    _clear_error(capsys, str(path), "NaN or inf")
    nan = Entry(torch.full((8,), float("nan")), torch.zeros(4, 2, 2), 0.9, "ct", "liver", "c9")
    assert bank.add(nan) == "not finite" and len(bank) == 3  # never written


def test_pruning_in_place_records_the_new_digest_in_model_json(tmp_path):
    path = tmp_path / "memory.safetensors"
    _memory_bank(path)
    (tmp_path / "model.json").write_text(json.dumps({"files": {"memory.safetensors": "old"}}))
    assert main(["memory", "prune", str(path), "--keep", "1"]) == 0
    files = json.loads((tmp_path / "model.json").read_text())["files"]
    assert files["memory.safetensors"] == sha256_file(path)


def test_similarity_prior_digest_and_non_finite_pool(tmp_path):
    from samed2_kit.sources.similarity import SimilarityPrior, SimilarityPriorConfig

    model_id = {"variant": "test-tiny", "image_size": 64}
    prior = SimilarityPrior(SimilarityPriorConfig(classes=["liver"], slots=4, dim=8), 64, model_id)
    path = prior.save(tmp_path / "prior.safetensors")
    SimilarityPrior.load(path, 64, model_id)
    _rewrite(path, "pool", lambda t: t.add_(1.0))
    with pytest.raises(ValueError, match=r"prior.safetensors is damaged: .*sha256"):
        SimilarityPrior.load(path, 64, model_id)
    prior.save(path)
    _rewrite(path, "pool", lambda t: t.fill_(float("inf")), lambda h: h.pop("digest"))
    with pytest.raises(ValueError, match=r"prior.safetensors: pool hold NaN or inf"):
        SimilarityPrior.load(path, 64, model_id)


# -- 4: random bytes as a .pt ------------------------------------------------------------------
class _Code:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_random_bytes_are_not_a_checkpoint_but_real_pickles_with_code_are_refused(tmp_path):
    rand = tmp_path / "rand.pt"
    rand.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"rand.pt is not a PyTorch checkpoint \(random/corrupt"):
        read_state_dict(rand)
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "obj": _Code()}, buf)
    (tmp_path / "code.pt").write_bytes(buf.getvalue())
    (tmp_path / "plain.pkl.pt").write_bytes(pickle.dumps({"model": _Code()}))
    for name in ("code.pt", "plain.pkl.pt"):
        with pytest.raises(ValueError, match="needs arbitrary code execution"):
            read_state_dict(tmp_path / name)
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}}, buf)
    (tmp_path / "cut.pt").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="cut.pt is a truncated or corrupt torch file"):
        read_state_dict(tmp_path / "cut.pt")


# -- 5/6/7: a run refused before its folder exists; CLI messages; "held-out" -----------------------
def test_refused_runs_leave_no_folder_and_the_corrected_rerun_works(
    saved_run, hc18_store, tmp_path, capsys
):
    recipe = _recipe_file(tmp_path, hc18_store)
    out = tmp_path / "out"
    rand = tmp_path / "rand.pt"
    rand.write_bytes(os.urandom(2048))
    cut = _copy(saved_run, tmp_path, "cut")
    _drop_digests(cut)
    _truncate(cut / "model.safetensors")
    refused = [
        (["data.tasks=[nope]"], ["data.tasks", "'nope'", "fetal_head"]),
        ([f"model.checkpoint={tmp_path / 'missing.pt'}"], ["model.checkpoint", "missing.pt"]),
        ([f"model.checkpoint={rand}"], ["model.checkpoint", "not a PyTorch checkpoint"]),
        ([f"model.checkpoint={cut}"], ["model.checkpoint", "truncated or not a safetensors"]),
        ([f"data.store={tmp_path / 'nostore'}"], ["nostore"]),
        ([f"data.store={out / 'store'}"], ["lies inside the run folder"]),
        (["eval.split=nosplit"], ["no split 'nosplit'"]),
    ]
    for overrides, parts in refused:
        assert main(["train", recipe, "--out", str(out), *BASE, *overrides]) == 2
        _clear_error(capsys, *parts)
        assert not out.exists(), overrides
    # --overwrite of an existing folder: a refused run leaves it as it was
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["train", recipe, "--out", str(out), "--overwrite", *BASE,
                 "data.tasks=[nope]"]) == 2  # fmt: skip
    _clear_error(capsys, "data.tasks")
    assert (out / "keep.txt").is_file()
    # corrected: from the saved run's weights, evaluated on the training split (not held out)
    assert main(["train", recipe, "--out", str(out), "--overwrite", *BASE,
                 f"model.checkpoint={saved_run}", "eval.split=train"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Dice on split 'train' (not held out)" in printed and "held-out" not in printed
    text = (out / "report.md").read_text()
    assert "Metrics on split 'train' (not held out)" in text and "held-out" not in text.lower()


def test_cli_override_and_recipe_mistakes_are_one_line(hc18_store, tmp_path, capsys):
    recipe = _recipe_file(tmp_path, hc18_store)
    out = str(tmp_path / "out")
    cases = [
        (["train", recipe, "--out", out, "train.steps", "5"],
         "override 'train.steps' is not key=value (e.g. train.steps=100): write train.steps=5"),
        (["train", recipe, "train.steps", "5", "--out", out],
         "override 'train.steps' is not key=value (e.g. train.steps=100)"),
        (["train", recipe, "--out", out, "train.lr=-0.001"],
         "train.lr=-0.001: the learning rate must be > 0"),
        (["train", recipe, "--out", out, "train.steps=[1,"],
         "override 'train.steps=[1,': the value '[1,' is not valid YAML"),
        (["train", str(tmp_path), "--out", out], "is a folder: pass the recipe's YAML file"),
        (["eval", str(tmp_path / "nothere")], "does not exist"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        _clear_error(capsys, message)
    (tmp_path / "list.yaml").write_text("- a\n")
    assert main(["train", str(tmp_path / "list.yaml")]) == 2
    _clear_error(capsys, "list.yaml holds a list, not a mapping")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    assert main(["train", str(tmp_path / "bin.yaml")]) == 2
    _clear_error(capsys, "bin.yaml cannot be read as text")
    assert not (tmp_path / "out").exists()


def test_held_out_is_said_only_of_another_split():
    assert report.held_out_label("Dice", ("test", "train")) == "held-out Dice"
    assert report.held_out_label("Dice") == "held-out Dice"
    assert report.held_out_label("Dice", ("train", "train")) == (
        "Dice on split 'train' (not held out)"
    )
