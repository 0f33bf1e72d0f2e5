import pytest

from samed2_kit.config import Recipe, from_dict, load_recipe

REPO_RECIPE = "recipes/quickstart.yaml"


def test_quickstart_recipe_loads_with_overrides():
    r = load_recipe(
        REPO_RECIPE, ["train.steps=7", "model.image_size=512", "train.mixed_precision=no"]
    )
    assert isinstance(r, Recipe)
    assert r.train.steps == 7 and r.model.image_size == 512
    assert r.train.mixed_precision == "no"  # YAML's bare `no` is a bool: read back as the word
    assert r.data.spec.endswith("recipes/medbank_samples.yaml")  # resolved next to the recipe
    assert r.data.tasks == ["fetal_head"]
    assert r.data.prompt.mode == "box"


def test_unknown_keys_are_errors_naming_key_file_and_fix(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  stpes: 10\n")
    with pytest.raises(
        ValueError, match=r"unknown key 'train.stpes' in .*r.yaml; did you mean 'steps'"
    ):
        load_recipe(path)
    with pytest.raises(ValueError, match="unknown key 'model.size'"):
        load_recipe(REPO_RECIPE, ["model.size=3"])
    with pytest.raises(ValueError, match="unknown key 'data.prompt.nod'"):
        from_dict(Recipe, {"data": {"prompt": {"nod": "x"}}})


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_recipe(path)


# (recipe file, overrides, error, message): types, override syntax, enum and range checks
BAD_RECIPES = [
    (None, ["train.steps=1.5"], ValueError, "train.steps .* must be an integer"),
    (None, ["train.lr=fast"], ValueError, "must be a number"),
    (None, ["train.steps"], ValueError, "not key=value"),
    ("nope.yaml", [], FileNotFoundError, "nope.yaml"),
    (None, ["data.prompt.mode=circle"], ValueError, "PromptConfig.mode='circle'"),
    (None, ["train.keep_last=0"], ValueError, "train.keep_last=0 must be >= 1"),
    (None, ["train.save_every=-1"], ValueError, "train.save_every=-1"),
    (None, ["continual={stages: [{name: a, tasks: []}]}"], ValueError, "needs at least one task"),
    (None, ["continual={stages: [{name: a, tasks: [x], step: 3}]}"], ValueError,
     "unknown key 'continual.stages\\[0\\].step'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, overrides, error, match", BAD_RECIPES, ids=[" ".join(c[1]) or c[0] for c in BAD_RECIPES]
)
def test_type_errors_bad_overrides_and_bad_values(path, overrides, error, match):
    with pytest.raises(error, match=match):
        load_recipe(path, overrides)


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from samed2_kit.medbank.spec import load_spec

    root = Path(__file__).resolve().parents[2] / "recipes"
    training = [p for p in sorted(root.glob("*.yaml")) if not p.name.startswith("medbank_")]
    assert {p.name for p in training} >= {"quickstart.yaml", "continual_new_modality.yaml"}
    for path in training:
        r = load_recipe(path)
        assert r.data.spec is None or Path(r.data.spec).is_file(), path
        if r.data.spec:
            load_spec(r.data.spec)  # the build spec it names validates too
    for path in sorted(root.glob("medbank_*.yaml")):
        load_spec(path)
    cont = load_recipe(root / "continual_new_modality.yaml")
    assert [s.name for s in cont.continual.stages] == ["ultrasound", "ct"]


@pytest.mark.parametrize(("override", "key"), [
    ("model.variant=huge", "model.variant"), ("model.image_size=300", "model.image_size"),
    ("train.lr=-0.001", "train.lr"), ("train.weight_decay=-1", "train.weight_decay"),
])  # fmt: skip
def test_bad_model_and_train_values_are_refused_when_the_recipe_is_read(override, key):
    from samed2_kit.config import load_recipe

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_a_run_that_fails_before_training_leaves_no_folder(hc18_store, tmp_path):
    """An unknown task is found after the run folder was opened: the folder goes, so the
    corrected rerun starts as if nothing happened."""
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    base = [f"data.store={hc18_store}", "model.image_size=64", "train.steps=1",
            "train.warmup_steps=0", "train.tensorboard=false", "train.mixed_precision=no",
            "eval.max_items=1"]  # fmt: skip
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="tasks"):
        run_recipe(load_recipe(None, [*base, "data.tasks=[nope]"]), out, progress=False)
    assert not out.exists()
    summary = run_recipe(load_recipe(None, base), out, progress=False)
    assert summary["overall"]["n"] == 1 and (out / "model.json").is_file()


def test_the_recipe_names_every_buildable_variant():
    from samed2_kit.config import VARIANT_NAMES
    from samed2_kit.model.build import VARIANTS

    assert set(VARIANT_NAMES) == set(VARIANTS)
