"""A whole run from a recipe: store (built by case split) -> train -> save -> evaluate -> report.

    out_dir-store/                    the medbank store the recipe's spec built (reused if unchanged)
    out_dir/
      run.json                        the recipe, written when the run starts
      checkpoints/step-NNNNNN/        every train.save_every steps, the newest train.keep_last
      train_log.jsonl                 loss, lr, samples/s per step; validation Dice per task
      tensorboard/                    event files (`tensorboard --logdir out_dir`)
      model.safetensors, model.json   trained weights (sam2 key names) + variant/size/recipe
      metrics.json                    summary per task, modality and overall, model and box baseline
      per_case.csv                    one row per evaluated sample (eval.split)
      training_curve.png, val_dice.png, overlays.png, report.md

Each file is written atomically (temp + rename). A run killed mid-way leaves its checkpoints, and
`--resume` continues it exactly; the final files appear only when it completes.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path

import torch

from samed2_kit.config import Recipe, to_dict

log = logging.getLogger(__name__)


def prepare_store(recipe: Recipe, out_dir: Path) -> str:
    """The recipe's store: built from `data.spec` when absent or built from another spec."""
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.schema import MANIFEST
    from samed2_kit.medbank.spec import load_spec
    from samed2_kit.medbank.store import default_store

    d = recipe.data
    store = Path(d.store) if d.store else default_store(out_dir)
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


RUN_JSON = "run.json"


def check_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run folder the run may not use (changes nothing): with `resume` it must hold a
    started run; without, it must be empty unless `overwrite`."""
    from samed2_kit.engine.state import checkpoint_dirs

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: pass a folder for the run")
    if resume:
        if not (out_dir / RUN_JSON).is_file():
            raise ValueError(
                f"--resume: {out_dir} holds no started run ({RUN_JSON} is missing); start "
                "without --resume"
            )
        return
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        what = "checkpoints of a run" if checkpoint_dirs(out_dir) else "files"
        raise ValueError(
            f"run folder {out_dir} already holds {what}: pass --resume to continue it, "
            "--overwrite to replace it, or --out to write elsewhere"
        )


def open_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check (and on `overwrite`, clear) the run folder before a run; main process only."""
    check_run_dir(out_dir, resume, overwrite)
    if resume:
        return
    if out_dir.is_dir() and any(out_dir.iterdir()):
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def check_store_place(recipe: Recipe, out_dir: Path, resume: bool) -> None:
    """A new run's store may not lie inside its run folder: the store is prepared before the
    folder is created (or cleared by --overwrite)."""
    store = recipe.data.store
    if store and not resume and Path(store).resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(
            f"data.store={store} lies inside the run folder {out_dir}: put it beside the run "
            f"folder (the default: {out_dir}-store) or elsewhere"
        )


def check_checkpoint(recipe: Recipe) -> None:
    """`model.checkpoint` exists and is a weights file (quick checks, no tensors read)."""
    from samed2_kit.model.build import check_checkpoint as check

    if recipe.model.checkpoint:
        try:
            check(recipe.model.checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"model.checkpoint: {e}") from e


def check_tasks(
    recipe: Recipe, store: str, tasks: list[str] | None, key: str = "data.tasks"
) -> None:
    """Every task the run names (in recipe key `key`) is in the store's training split."""
    if not tasks:
        return
    found = store_tasks(store, recipe.data.train_split)
    unknown = [t for t in tasks if t not in found]
    if unknown:
        raise ValueError(
            f"{key}: {unknown} not in split {recipe.data.train_split!r} of store {store}, "
            f"which holds tasks {', '.join(found) or 'none'}: set {key} to some of them"
        )


def remove_unstarted(out_dir: Path) -> None:
    """Remove a run folder this run created when it failed before its first logged step and
    checkpoint (a bad recipe, store or checkpoint), so that the corrected rerun starts clean."""
    from samed2_kit.engine.state import checkpoint_dirs

    log = out_dir / "train_log.jsonl"
    started = checkpoint_dirs(out_dir) or (log.is_file() and log.stat().st_size > 0)
    if out_dir.is_dir() and not started:
        shutil.rmtree(out_dir, ignore_errors=True)


def validation(recipe: Recipe, store: str, tasks: list[str] | None):
    """A `validate(model) -> {"dice/<task>": value}` for the training loop (None when off)."""
    import dataclasses

    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine.items import model_supports

    t = recipe.train
    if not t.val_every:
        return None
    # validation skips the clicks: the box (2D) or key-slice box (3D) alone
    prompt = recipe.eval.prompt.removesuffix("+clicks")
    cfg = dataclasses.replace(recipe.eval, prompt=prompt, split=t.val_split,
                              max_items=t.val_max_items or None)  # fmt: skip
    items = ev.eval_items(store, cfg, tasks)  # a clear error when the split is absent

    def validate(model) -> dict[str, float]:
        sup = model_supports(model, store, recipe.data.train_split, tasks, recipe.eval.supports)
        rows, _ = ev.evaluate(model, items, cfg, progress=False, supports=sup)
        per_task = ev.summarize(rows)["per_task"]
        return {f"dice/{task}": s["dice"] for task, s in per_task.items()}

    return validate


def describe(recipe: Recipe, result, accel, store: str, n_eval: int, name: str) -> dict:
    """The run's setup in words, for metrics.json and the report."""
    m, t = recipe.model, recipe.train
    return {
        "name": name,
        "model": f"{m.variant} at {m.image_size} px"
        + (f", from {m.checkpoint}" if m.checkpoint else ", random init"),
        "training": f"{t.steps} steps x batch {t.batch_size} x {accel.num_processes} process(es)"
        f" x {t.grad_accum} accumulation, mode {t.mode}, {result.trainable_params:,} trainable "
        f"parameters, precision {result.mixed_precision}, {result.seconds:.0f} s for "
        f"{result.steps_run} steps on {accel.device} "
        f"({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "data": f"store {store}: {result.train_samples} training samples "
        f"(split {recipe.data.train_split}), {n_eval} "
        + (
            f"held-out (split {recipe.eval.split})"
            if recipe.eval.split != recipe.data.train_split
            else f"evaluated (split {recipe.eval.split}: the training split, not held out)"
        ),
        "modalities": store_modalities(store, recipe.data.train_split),
        "eval_prompt": recipe.eval.prompt,
        **({"eval_clicks": recipe.eval.clicks} if recipe.eval.prompt.endswith("+clicks") else {}),
        "nsd_tolerance_mm": recipe.eval.nsd_tolerance_mm,
    }


def start_run(recipe: Recipe, out_dir: Path, resume: bool, overwrite: bool, check=None):
    """Join the launch's processes, check the run, prepare the store, then create the run folder;
    returns (state, store, check(store)).

    Everything is checked before the run folder is created or cleared: the folder itself
    (--resume, --overwrite), `model.checkpoint`, the store (built from `data.spec` when needed,
    into its own folder) and `check(store)` (the run's tasks and splits), so a refused run leaves
    no folder behind. The main process checks and builds first, the others then reuse the store.
    PartialState does not read ACCELERATE_USE_CPU by itself (Accelerator does): without it, CPU
    ranks would not see each other."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from samed2_kit.utils.atomic import write_text

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.main_process_first():
        if state.is_main_process:
            check_run_dir(out_dir, resume, overwrite)
            check_store_place(recipe, out_dir, resume)
            check_checkpoint(recipe)
        store = prepare_store(recipe, out_dir)
    checked = check(store) if check is not None else None
    if state.is_main_process:
        open_run_dir(out_dir, resume, overwrite)
        if not resume:
            write_text(out_dir / RUN_JSON, json.dumps({"recipe": to_dict(recipe)}, indent=2))
    state.wait_for_everyone()
    return state, store, checked


def store_modalities(store: str, split: str) -> list[str]:
    """The modalities of a store's split (its manifest's counts), sorted."""
    from samed2_kit.medbank.store import open_store

    counts = open_store(store)[0].get("counts", [])
    return sorted({c["modality"] for c in counts if c["split"] == split})


def store_tasks(store: str, split: str) -> list[str]:
    """The tasks of a store's split, sorted."""
    from samed2_kit.medbank.store import open_store

    _, _, samples = open_store(store)
    cols = samples.select_columns(["split", "task"]).to_dict()  # columns, not rows
    return sorted({t for s, t in zip(cols["split"], cols["task"], strict=True) if s == split})


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train and evaluate as the recipe says; returns the metrics summary ({} on other ranks)."""
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.items import model_supports
    from samed2_kit.engine.train import train
    from samed2_kit.model import assemble

    out_dir = Path(out_dir or recipe.out_dir)
    d = recipe.data
    fresh = not (out_dir.is_dir() and any(out_dir.iterdir())) or (overwrite and not resume)

    def check(store: str):  # before the run folder is created: tasks and splits exist
        check_tasks(recipe, store, d.tasks)
        eval_items = ev.eval_items(store, recipe.eval, d.tasks)
        validate = validation(recipe, store, d.tasks)
        return eval_items, validate, d.tasks or store_tasks(store, d.train_split)

    opened = False  # a run refused before it opened its folder changed nothing
    try:
        state, store, (eval_items, validate, tasks) = start_run(
            recipe, out_dir, resume, overwrite, check
        )
        opened = True
        model = assemble.from_recipe(recipe, tasks)
        model, result, accel = train(
            recipe, model, store, out_dir, resume=resume, validate=validate, progress=progress
        )
    except Exception:
        if fresh and opened:
            remove_unstarted(out_dir)
        raise
    sup = model_supports(model, store, d.train_split, d.tasks, recipe.eval.supports)
    rows, preds = ev.evaluate(model, eval_items, recipe.eval, progress and accel.is_main_process,
                              supports=sup)  # fmt: skip
    summary = ev.summarize(rows)
    if accel.is_main_process:
        info = describe(recipe, result, accel, store, len(eval_items), out_dir.name)
        write_outputs(out_dir, model, recipe, summary, info, result, (eval_items, rows, preds))
    accel.wait_for_everyone()
    accel.end_training()
    if not accel.is_main_process:
        return {}
    o, splits = summary["overall"], (recipe.eval.split, d.train_split)
    print(
        f"[samed2] {report.held_out_label('Dice', splits)} {o['dice']:.3f} vs box baseline "
        f"{o['box_dice']:.3f} "
        f"({report.gain_text(o)}, 95% CI by case); NSD {o['nsd']:.3f}; HD95 {o['hd95']:.2f} mm; "
        f"n={o['n']} of {o['cases']} cases\n"
        f"[samed2] run folder: {out_dir}  (report: {out_dir / 'report.md'})"
    )
    return summary


def write_outputs(out_dir: Path, model, recipe, summary, info, result, evaluated) -> None:
    """Final weights, per-case CSV, metrics.json, plots and report.md (each file atomic)."""
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.train import read_log
    from samed2_kit.model import assemble
    from samed2_kit.utils.atomic import atomic_path, write_text

    items, rows, preds = evaluated
    splits = (recipe.eval.split, recipe.data.train_split)  # "held-out" only when they differ
    log = read_log(out_dir) or [
        {"step": h.step, "loss": h.loss} for h in result.history
    ]  # fmt: skip
    # what the model trained on: `samed2 predict` takes its intensity handling for volumes
    assemble.save(model, out_dir, {"recipe": to_dict(recipe), "modalities": info["modalities"]})
    ev.write_csv(rows, out_dir / "per_case.csv")
    final = [e for e in log if "loss" in e]
    metrics = {"summary": summary, "info": info, "train_seconds": result.seconds,
               "final_loss": final[-1]["loss"] if final else None,
               "validation": [e for e in log if "val" in e], "recipe": to_dict(recipe)}  # fmt: skip
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    plots = {"training_curve.png": lambda p: report.plot_curve(log, p),
             "overlays.png": lambda p: report.plot_overlays(items, rows, preds, p, splits=splits)}  # fmt: skip
    if metrics["validation"]:
        plots["val_dice.png"] = lambda p: report.plot_validation(metrics["validation"], p)
    if "click_dice" in summary["overall"]:
        plots["click_curve.png"] = lambda p: report.plot_click_curve(summary, p)
    for name, draw in plots.items():
        with atomic_path(out_dir / name) as tmp:
            draw(tmp)
    curve = "click_curve.png" if "click_curve.png" in plots else None
    text = report.markdown(summary, info, curve, metrics["validation"], splits)
    write_text(out_dir / "report.md", text)
