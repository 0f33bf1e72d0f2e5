"""`samed2`: the command line.

samed2 quickstart [--checkpoint PATH] [--out DIR] [key=value ...]
samed2 train RECIPE.yaml [--out DIR] [key=value ...]
samed2 eval RUN_DIR [--recipe RECIPE.yaml] [key=value ...]
samed2 info
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _quickstart_recipe() -> Path:
    path = REPO_RECIPES / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a clone of samed2-kit installed with "
            "`bash scripts/install.sh`, or use `samed2 train path/to/quickstart.yaml`"
        )
    return path


def cmd_quickstart(args) -> int:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"model.checkpoint={args.checkpoint}")
    recipe = load_recipe(_quickstart_recipe(), overrides)
    summary = run_recipe(recipe, args.out)
    o = summary.get("overall")
    if o and o["dice"] <= o["box_dice"]:
        print("[samed2] note: the model did not beat the box baseline on this run", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    run_recipe(load_recipe(args.recipe, args.overrides), args.out)
    return 0


def cmd_eval(args) -> int:
    from samed2_kit.config import Recipe, apply_overrides, from_dict, load_recipe
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine.checkpoint import load_model
    from samed2_kit.engine.items import items_from_store

    run = Path(args.weights)
    model = load_model(run)
    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
    else:
        saved = json.loads(((run if run.is_dir() else run.parent) / "model.json").read_text())
        if "recipe" not in saved:
            raise ValueError(f"{run} has no recipe in model.json: pass --recipe RECIPE.yaml")
        recipe = from_dict(Recipe, apply_overrides(saved["recipe"], args.overrides), "", str(run))
    store = args.store or recipe.data.store or str(run.with_name(run.name + "-store"))
    items = items_from_store(store, recipe.eval.split, recipe.data.tasks)
    rows, _ = ev.evaluate(model, items, recipe.eval.prompt, recipe.eval.nsd_tolerance_mm)
    summary = ev.summarize(rows)
    if args.csv:
        ev.write_csv(rows, args.csv)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_info(args) -> int:
    import torch

    from samed2_kit import __version__
    from samed2_kit.model.build import VARIANTS

    print(f"samed2-kit {__version__}; torch {torch.__version__}; cuda {torch.cuda.is_available()}")
    print(f"variants: {', '.join(VARIANTS)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samed2", description="Fine-tune SAM 2 for medical images.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="train + evaluate on the bundled sample data")
    q.add_argument("--checkpoint", help="SAM 2 checkpoint (.pt) to fine-tune from")
    q.add_argument("--out", help="run folder (default: recipe out_dir)")
    q.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train and evaluate from a YAML recipe")
    t.add_argument("recipe")
    t.add_argument("--out", help="run folder (default: recipe out_dir)")
    t.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run folder on its recipe's test split")
    e.add_argument("weights", help="run folder (model.safetensors + model.json)")
    e.add_argument("--recipe", help="recipe whose data to evaluate on (default: the saved one)")
    e.add_argument("--store", help="medbank store to evaluate on (default: the run's)")
    e.add_argument("--csv", help="write per-case rows here")
    e.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    e.set_defaults(func=cmd_eval)

    from samed2_kit.medbank.cli import add_parser as add_medbank

    add_medbank(sub)

    i = sub.add_parser("info", help="versions and model variants")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="[samed2] %(levelname)s %(message)s")
    parser = build_parser()
    # key=value overrides may come after options (`train R.yaml --out D a=1`): argparse leaves them
    args, extra = parser.parse_known_args(argv)
    stray = [
        e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"samed2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
