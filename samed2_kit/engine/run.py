"""A whole run from a recipe: data -> split by case -> train -> save -> evaluate -> report.

The run folder, written atomically (a failed run leaves no half-written folder):

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
from dataclasses import asdict
from pathlib import Path

import torch

from samed2_kit.config import Recipe, SourceConfig, to_dict

log = logging.getLogger(__name__)


def pair_source(src: SourceConfig):
    """A SourceConfig as a PairSource (a bundled sample set, or a folder of your own)."""
    from samed2_kit.medbank.pairs import PairSource, sample_sources

    if src.sample is not None:
        samples = sample_sources()
        if src.sample not in samples:
            raise ValueError(
                f"data.sources: unknown sample {src.sample!r}; bundled: {sorted(samples)}"
            )
        return samples[src.sample]
    missing = [k for k in ("root", "image", "mask") if getattr(src, k) is None]
    if missing:
        raise ValueError(
            f"data.sources: a folder source needs root, image and mask; missing {missing}"
        )
    fields = {k: v for k, v in asdict(src).items() if k != "sample"}
    return PairSource(**fields)


def load_splits(recipe: Recipe) -> dict[str, list]:
    """Scan every source, report skipped files, split each source by case (seeded)."""
    from samed2_kit.medbank.pairs import find_pairs, split_by_case

    splits: dict[str, list] = {k: [] for k in recipe.data.split}
    for src in recipe.data.sources:
        scan = find_pairs(pair_source(src))
        for path, reason in scan.skipped:
            log.warning("skipped %s: %s", path, reason)
        if not scan.records:
            raise ValueError(f"data source {src} yielded no image/mask pairs: check its patterns")
        for k, v in split_by_case(scan.records, recipe.data.split, recipe.data.split_seed).items():
            splits[k].extend(v)
    return splits


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Train and evaluate as the recipe says; returns the metrics summary."""
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.checkpoint import save_model
    from samed2_kit.engine.train import train
    from samed2_kit.model.build import build_model
    from samed2_kit.utils.atomic import atomic_path, write_text

    out_dir = Path(out_dir or recipe.out_dir)
    splits = load_splits(recipe)
    if not splits.get("train"):
        raise ValueError("data.split has no 'train' part with cases in it")
    eval_split = recipe.eval.split
    if not splits.get(eval_split):
        raise ValueError(f"eval.split={eval_split!r} is empty: data.split has {list(splits)}")
    counts = {k: len(v) for k, v in splits.items()}
    print(f"[samed2] samples per split: {counts} (split by case, seed {recipe.data.split_seed})")

    m = recipe.model
    model = build_model(m.variant, m.checkpoint, m.image_size)
    model, result, accel = train(recipe, model, splits["train"], progress=progress)
    if not accel.is_main_process:
        accel.end_training()
        return {}
    rows, preds = ev.evaluate(
        model, splits[eval_split], recipe.eval.prompt, recipe.eval.nsd_tolerance_mm, progress
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
        "data": ", ".join(f"{k}: {v} samples" for k, v in counts.items()),
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
        report.plot_overlays(splits[eval_split], rows, preds, tmp / "overlays.png")
        write_text(tmp / "report.md", report.markdown(summary, info))
    accel.end_training()
    o = summary["overall"]
    print(
        f"[samed2] held-out Dice {o['dice']:.3f} vs box baseline {o['box_dice']:.3f} "
        f"({o['dice'] - o['box_dice']:+.3f}); NSD {o['nsd']:.3f}; HD95 {o['hd95']:.2f} mm; "
        f"n={o['n']}\n[samed2] run folder: {out_dir}  (report: {out_dir / 'report.md'})"
    )
    return summary
