"""A small study: the same training budget with and without temporal adapters.

Held-out case, held-out slices: train on one CT volume (TotalSegmentator crop, NIfTI, 3 mm), test
on another CT case (the TotalSegmentator DICOM series, 2 mm) for the same organs; and train on
brain MR case 1, test on brain MR case 2 (tumour ROI). Both arms train test-tiny from the same
random init on the same clips of T adjacent slices for the same number of steps; the adapter arm
adds temporal adapters in every block. Evaluation feeds each held-out slice with its T-1
neighbours (clip_len=T) and a tight box prompt, and reports Dice of the centre slice.

Needs ../shared/data (the DICOM CT is not bundled).
    .venv/bin/python bench/study_temporal.py [--steps 400] [--T 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ORGANS = "[liver, spleen, aorta, stomach, colon, kidney_left, kidney_right]"

SPEC = f"""
split: {{train: 1.0}}
clip_radius: 2
sources:
  - {{name: ct_train, layout: volumes, root: {SHARED}/totalseg_ct_mr, modality: ct, task: ct_organs,
     licence: CC-BY-4.0, labels_json: label_map_total_and_total_mr.json, labels_key: total,
     include: {ORGANS}, items: [{{id: ct_nifti, image: example_ct_sm.nii.gz, mask: example_seg.nii.gz}}]}}
  - {{name: ct_test, layout: dicom, root: {SHARED}/totalseg_ct_mr, modality: ct, task: ct_organs,
     licence: CC-BY-4.0, labels_json: label_map_total_and_total_mr.json, labels_key: total,
     include: {ORGANS}, split: {{test: 1.0}},
     items: [{{id: ct_dicom, image: example_ct_dicom, mask: example_seg_dicom.nii.gz}}]}}
  - {{name: brain, layout: volumes, root: {SHARED}/pyradiomics_mri, modality: mr, task: brain_tumour,
     licence: BSD-3-Clause, labels: {{1: tumour}}, split: {{train: 0.5, test: 0.5}},
     image: "brain{{id}}_image.nrrd", mask: "brain{{id}}_label.nrrd"}}
"""


def evaluate_clips(model, store: str, t: int) -> dict[str, list[float]]:
    """Dice of each held-out (test) sample's centre slice, predicted from a T-slice clip."""
    from samed2_kit.medbank.dataset import StoreDataset
    from samed2_kit.metrics import case_metrics
    from samed2_kit.model import Prompts
    from samed2_kit.prompts import PromptConfig

    ds = StoreDataset(store, split="test", clip_len=t, image_size=model.image_size,
                      prompt=PromptConfig(box_jitter=0.0), augment=False)  # fmt: skip
    out: dict[str, list[float]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            gt = item["mask"][t // 2, 0].numpy() > 0.5
            if not gt.any():
                continue
            boxes = item["box"][None].expand(t, 4)
            res = model(item["image"], Prompts(boxes=boxes), clip_len=t)
            logits = torch.nn.functional.interpolate(
                res.low_res_logits, size=gt.shape, mode="bilinear"
            )
            pred = logits[t // 2, 0].numpy() > 0
            out.setdefault(item["task"], []).append(case_metrics(pred, gt).dice)
    return out


def run_arm(store: str, adapters: bool, steps: int, t: int) -> dict[str, list[float]]:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.train import train
    from samed2_kit.model import build_model
    from samed2_kit.model.assemble import add_adapters

    overrides = [f"train.steps={steps}", "train.batch_size=2", f"data.clip_len={t}",
                 "train.lr=0.0005", "train.mixed_precision=no", "train.warmup_steps=20",
                 "model.image_size=256", f"data.store={store}"]  # fmt: skip
    if adapters:
        overrides += [
            "adapters.temporal={rank: 32}",
            "train.trainable=[all]",
            "train.lr_mult={temporal_adapter: 10}",
        ]
    recipe = load_recipe(None, overrides)
    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256)
    add_adapters(model, recipe.adapters)
    model, result, accel = train(recipe, model, store, progress=False)
    accel.end_training()
    print(f"  trained {'with' if adapters else 'without'} adapters: {result.seconds:.0f} s, final loss "
          f"{np.mean([h.loss for h in result.history[-20:]]):.3f}")  # fmt: skip
    return evaluate_clips(model, store, t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--T", type=int, default=3)
    args = ap.parse_args()
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec
    from samed2_kit.medbank.store import info_table

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spec.yaml").write_text(SPEC)
        spec, sha = load_spec(Path(tmp) / "spec.yaml")
        build(spec, Path(tmp) / "store", sha, progress=False)
        store = str(Path(tmp) / "store")
        print(info_table(store) + "\n")
        arms = {
            name: run_arm(store, name == "with", args.steps, args.T) for name in ("without", "with")
        }
    print(
        f"\n{args.steps} steps x 2 clips x T={args.T}, test-tiny 256 px, same init and data order\n"
    )
    print("| task (held-out case) | slices | Dice without adapters | Dice with temporal adapters |")
    print("| --- | --- | --- | --- |")
    for task in sorted(arms["without"]):
        a, b = arms["without"][task], arms["with"][task]
        print(
            f"| {task} | {len(a)} | {np.mean(a):.3f} +- {np.std(a):.3f} | {np.mean(b):.3f} +- {np.std(b):.3f} |"
        )


if __name__ == "__main__":
    main()
