"""docs/recipe-reference.md is generated from the recipe dataclasses and must be current."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "recipe_reference.py"


def test_recipe_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("recipe_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render()
    assert "`train.lr_mult`" in text and "`adapters.temporal.rank`" in text
    assert "`sources.hard_prototypes.max_supports`" in text
    assert module.main(["--check"]) == 0, "run: python scripts/recipe_reference.py"
