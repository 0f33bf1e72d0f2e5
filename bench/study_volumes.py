"""Study: what makes propagation through a volume work, on the bundled hippocampus volumes.

Arms, each test-tiny from random init at 64 px, the same 1500 steps and seed, split by case
(30 train / 10 test volumes of `recipes/medbank_hippocampus.yaml`):

- 2d: `train.step: image`, batch 28 (the slices a sequence step sees), one box per slice;
- sequence: `recipes/volume_propagation.yaml` (runs of 7 slices, centre prompted, the rest
  propagated through SAM 2's memory path);
- sequence+clicks: the same, with simulated corrective clicks on the prompted slice
  (`train.clicks`: probability 0.5, 3 rounds);
- sequence+temporal: `recipes/temporal_adapter.yaml` (temporal adapters, clips of 3 in runs of 6);
- sequence+memory: `volume_propagation.yaml` with the confidence memory (`memory.top_k=4`, the
  defaults otherwise), read by every slice of the sequence.

For each: `slice-box` and `slice-box+clicks` (5 clicks in 3D) 3D Dice / NSD against the extruded
key-slice box (with the paired bootstrap 95% interval of the gain over cases), the per-click 3D
Dice and its AUC, and the Dice of each slice as a function of its distance from the prompted key
slice (slices where the object is present).

    .venv/bin/python bench/study_volumes.py [--steps 1500] [--out runs/study_volumes]
        [--arms sequence,sequence+clicks] [--reuse]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "2d": ("volume_propagation.yaml", ["train.step=image", "train.batch_size=28"]),
    "sequence": ("volume_propagation.yaml", []),
    "sequence+clicks": (
        "volume_propagation.yaml",
        ["train.clicks.prob=0.5", "train.clicks.rounds=3"],
    ),
    "sequence+temporal": ("temporal_adapter.yaml", []),
    "sequence+memory": ("volume_propagation.yaml", ["memory.top_k=4"]),
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
    from samed2_kit.config import EvalConfig, load_recipe
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.run import run_recipe
    from samed2_kit.medbank.store import default_store
    from samed2_kit.model.assemble import load

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "study_volumes")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    p.add_argument("--reuse", action="store_true", help="evaluate arms already trained in --out")
    args = p.parse_args()
    rows, curves = [], {}
    for name in args.arms.split(","):
        recipe_file, extra = ARMS[name]
        overrides = [*extra, f"train.steps={args.steps}", "train.save_every=0",
                     "train.tensorboard=false"]  # fmt: skip
        recipe = load_recipe(REPO / "recipes" / recipe_file, overrides)
        out = args.out / name
        if args.reuse and (out / "metrics.json").is_file():
            summary = json.loads((out / "metrics.json").read_text())["summary"]["overall"]
        else:
            summary = run_recipe(recipe, out, progress=False, overwrite=True)["overall"]
        items = ev.eval_items(str(default_store(out)), recipe.eval)
        model = load(out).eval()
        curves[name] = by_distance(model, items)
        clicked, _ = ev.evaluate(model, items, EvalConfig(prompt="slice-box+clicks", clicks=5,
                                                          split="test"), progress=False)  # fmt: skip
        rows.append((name, summary, ev.aggregate(clicked)))
    print(f"\n{args.steps} steps per arm; the 10 held-out volumes (3D, 1 mm voxels)")
    print("| arm | slice-box 3D Dice | extruded box | gain [95% CI by case] | NSD 2 mm | HD95 mm "
          "| +5 clicks: Dice | click AUC |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s, c in rows:
        print(f"| {name} | {s['dice']:.3f} | {s['box_dice']:.3f} | {report.gain_text(s)} | "
              f"{s['nsd']:.3f} | {s['hd95']:.2f} | {c['dice']:.3f} | {c['dice_auc']:.3f} |")  # fmt: skip
    print("\nmean 3D Dice after the box and after each click (slice-box+clicks)")
    for name, _, c in rows:
        print(f"- {name}: " + " -> ".join(f"{v:.3f}" for v in c["click_dice"]))
    bands = list(next(iter(curves.values())))
    print("\nper-slice Dice by distance from the prompted slice (slices)")
    print("| arm | " + " | ".join(bands) + " |")
    print("| --- |" + " --- |" * len(bands))
    for name, c in curves.items():
        print(f"| {name} | " + " | ".join(f"{c[b]:.3f}" for b in bands) + " |")


if __name__ == "__main__":
    main()
