"""A whole run from a recipe: store (built by case split) -> train -> save -> evaluate -> report.

The run folder, written atomically (a failed run leaves no half-written folder):

    out_dir-store/                    the medbank store the recipe's spec built (reused if unchanged)
    out_dir/
      model.safetensors, model.json   trained weights (sam2 key names) + variant/size/recipe
      metrics.json                    summary per task and overall, model and box baseline
      per_case.csv                    one row per held-out sample
      training_curve.png, overlays.png, report.md
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import torch

from samed2_kit.config import Recipe, to_dict

log = logging.getLogger(__name__)


def prepare_store(recipe: Recipe, out_dir: Path) -> str:
    """The recipe's store: built from `data.spec` when absent or built from another spec."""
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.schema import MANIFEST
    from samed2_kit.medbank.spec import load_spec

    d = recipe.data
    store = Path(d.store) if d.store else out_dir.with_name(out_dir.name + "-store")
    if d.spec is None:
        if not (store / MANIFEST).is_file():
            raise ValueError(f"data.store={store} is not a medbank store and data.spec is not set")
        return str(store)
    spec, sha = load_spec(d.spec)
    if (store / MANIFEST).is_file() and json.loads((store / MANIFEST).read_text()).get(
        "spec_sha256"
    ) == sha:
        print(f"[samed2] using store {store} (built from this spec)")
        return str(store)
    print(f"[samed2] building store {store} from {d.spec}")
    report = build(spec, store, sha)
    for path, why in report.skipped:
        log.warning("skipped %s: %s", path, why)
    return str(store)


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train and evaluate as the recipe says; returns the metrics summary."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.checkpoint import save_model
    from samed2_kit.engine.items import items_from_store
    from samed2_kit.engine.train import inject_adapters, train
    from samed2_kit.model.build import build_model
    from samed2_kit.utils.atomic import atomic_path, write_text

    out_dir = Path(out_dir or recipe.out_dir)
    # the main process builds the store, the others then reuse it. PartialState does not read
    # ACCELERATE_USE_CPU by itself (Accelerator does): without it, CPU ranks would not see each other
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.main_process_first():
        store = prepare_store(recipe, out_dir)
    eval_items = items_from_store(store, recipe.eval.split, recipe.data.tasks)

    m = recipe.model
    torch.manual_seed(recipe.train.seed)  # the random init (and any unloaded weights) by seed
    model = build_model(m.variant, m.checkpoint, m.image_size)
    inject_adapters(model, recipe)
    model, result, accel = train(recipe, model, store, progress=progress)
    if not accel.is_main_process:
        accel.end_training()
        return {}
    rows, preds = ev.evaluate(
        model, eval_items, recipe.eval.prompt, recipe.eval.nsd_tolerance_mm, progress
    )
    summary = ev.summarize(rows)
    info = {
        "name": out_dir.name,
        "model": f"{m.variant} at {m.image_size} px"
        + (f", from {m.checkpoint}" if m.checkpoint else ", random init"),
        "training": f"{recipe.train.steps} steps x batch {recipe.train.batch_size}, mode "
        f"{recipe.train.mode}, {result.trainable_params:,} trainable parameters, "
        f"precision {result.mixed_precision}, {result.seconds:.0f} s on {accel.device} "
        f"x {accel.num_processes} process(es) "
        f"({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "data": f"store {store}: {result.train_samples} training samples "
        f"(split {recipe.data.train_split}), {len(eval_items)} held-out (split {recipe.eval.split})",
        "eval_prompt": recipe.eval.prompt,
        "nsd_tolerance_mm": recipe.eval.nsd_tolerance_mm,
    }
    metrics = {"summary": summary, "info": info, "train_seconds": result.seconds,
               "final_loss": result.history[-1].loss, "recipe": to_dict(recipe)}  # fmt: skip
    with atomic_path(out_dir, directory=True) as tmp:
        save_model(model, tmp, {"recipe": to_dict(recipe)})
        ev.write_csv(rows, tmp / "per_case.csv")
        write_text(tmp / "metrics.json", json.dumps(metrics, indent=2, default=str))
        report.plot_curve(result.history, tmp / "training_curve.png")
        report.plot_overlays(eval_items, rows, preds, tmp / "overlays.png")
        write_text(tmp / "report.md", report.markdown(summary, info))
    accel.end_training()
    o = summary["overall"]
    print(
        f"[samed2] held-out Dice {o['dice']:.3f} vs box baseline {o['box_dice']:.3f} "
        f"({o['dice'] - o['box_dice']:+.3f}); NSD {o['nsd']:.3f}; HD95 {o['hd95']:.2f} mm; "
        f"n={o['n']}\n[samed2] run folder: {out_dir}  (report: {out_dir / 'report.md'})"
    )
    return summary
