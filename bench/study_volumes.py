"""Study: what makes propagation through a volume work, on the bundled hippocampus volumes.

Arms, each test-tiny from random init at 64 px, the same 1500 steps and seed, split by case
(30 train / 10 test volumes of `recipes/medbank_hippocampus.yaml`):

- 2d: `train.step: image`, batch 28 (the slices a sequence step sees), one box per slice;
- sequence: `recipes/volume_propagation.yaml` (runs of 7 slices, centre prompted, the rest
  propagated through SAM 2's memory path);
- sequence+temporal: `recipes/temporal_adapter.yaml` (temporal adapters, clips of 3 in runs of 6).

For each: `slice-box` 3D Dice / NSD against the extruded key-slice box (with the paired bootstrap
95% interval of the gain over cases), and the Dice of each slice as a function of its distance
from the prompted key slice (slices where the object is present).

    .venv/bin/python bench/study_volumes.py [--steps 1500] [--out runs/study_volumes]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "2d": ("volume_propagation.yaml", ["train.step=image", "train.batch_size=28"]),
    "sequence": ("volume_propagation.yaml", []),
    "sequence+temporal": ("temporal_adapter.yaml", []),
}
BANDS = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 99)]


def by_distance(model, items) -> dict[str, float]:
    """Mean per-slice Dice by distance band from the key slice (object-present slices)."""
    from samed2_kit.engine.volumes import key_slice
    from samed2_kit.prompts import Prompt, box_from_mask
    from samed2_kit.volume import propagate_volume

    scores: dict[tuple[int, int], list[float]] = {b: [] for b in BANDS}
    for it in items:
        images, gt = it.load_volume()
        z = key_slice(gt)
        pred = propagate_volume(model, images, {z: Prompt(box=box_from_mask(gt[z]))}, modality="2d")
        for k in np.nonzero(gt.any(axis=(1, 2)))[0]:
            d = 2 * (pred[k] & gt[k]).sum() / (pred[k].sum() + gt[k].sum())
            band = next(b for b in BANDS if b[0] <= abs(k - z) <= b[1])
            scores[band].append(float(d))
    return {f"{lo}-{hi}" if lo != hi else str(lo): float(np.mean(v)) if v else float("nan")
            for (lo, hi), v in scores.items()}  # fmt: skip


def main() -> None:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.run import run_recipe
    from samed2_kit.medbank.store import default_store
    from samed2_kit.model.assemble import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "study_volumes")
    args = p.parse_args()
    rows, curves = [], {}
    for name, (recipe_file, extra) in ARMS.items():
        overrides = [*extra, f"train.steps={args.steps}", "train.save_every=0",
                     "train.tensorboard=false"]  # fmt: skip
        recipe = load_recipe(REPO / "recipes" / recipe_file, overrides)
        out = args.out / name
        summary = run_recipe(recipe, out, progress=False, overwrite=True)["overall"]
        items = ev.eval_items(str(default_store(out)), recipe.eval)
        curves[name] = by_distance(load(out).eval(), items)
        rows.append((name, summary))
    print(f"\n{args.steps} steps per arm; slice-box on the 10 held-out volumes (3D, 1 mm voxels)")
    print("| arm | 3D Dice | extruded box | gain [95% CI by case] | NSD 2 mm | HD95 mm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in rows:
        print(f"| {name} | {s['dice']:.3f} | {s['box_dice']:.3f} | {report.gain_text(s)} | "
              f"{s['nsd']:.3f} | {s['hd95']:.2f} |")  # fmt: skip
    bands = list(next(iter(curves.values())))
    print("\nper-slice Dice by distance from the prompted slice (slices)")
    print("| arm | " + " | ".join(bands) + " |")
    print("| --- |" + " --- |" * len(bands))
    for name, c in curves.items():
        print(f"| {name} | " + " | ".join(f"{c[b]:.3f}" for b in bands) + " |")


if __name__ == "__main__":
    main()
