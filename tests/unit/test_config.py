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


def test_type_errors_and_bad_overrides():
    with pytest.raises(ValueError, match="train.steps .* must be an integer"):
        load_recipe(None, ["train.steps=1.5"])
    with pytest.raises(ValueError, match="must be a number"):
        load_recipe(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match="not key=value"):
        load_recipe(None, ["train.steps"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe("nope.yaml")
    with pytest.raises(ValueError, match="PromptConfig.mode='circle'"):
        load_recipe(None, ["data.prompt.mode=circle"])
