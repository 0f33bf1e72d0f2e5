"""The real 2D sets in ../shared/data that the studies read (in-house only; see its MANIFEST.md):
fetal head (HC18, ultrasound), breast lesion (BUSI, ultrasound), polyp (Kvasir-SEG, endoscopy);
and what the studies on them share: the command line, the spec, the base recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

_SPEC = """name: {name}
split: {{train: {train}, val: {val}, test: {test}}}
seed: 0
max_size: 512
sources:
  - {{name: hc18, layout: pairs, root: {root}/hc18, image: "images/{{id}}HC.png",
     mask: "masks/{{id}}HC_Annotation.png", case: '^(\\d+)',
     spacing_csv: training_set_pixel_size_and_HC.csv, modality: us, task: fetal_head,
     licence: CC-BY-4.0}}
  - {{name: busi, layout: pairs, root: {root}/busi, image: "images/{{id}}.png",
     mask: "masks/{{id}}_mask{{label}}.png", modality: us, task: breast_lesion, licence: unverified}}
  - {{name: kvasir_seg, layout: pairs, root: {root}/kvasir_seg, image: "images/{{id}}.jpg",
     mask: "masks/{{id}}.jpg", modality: endoscopy, task: polyp,
     licence: research-and-education-only}}
"""


def write_spec(path: Path, name: str, train: float, val: float, test: float) -> Path:
    """A medbank spec over the three sets, split by case, written to `path`."""
    path.write_text(_SPEC.format(name=name, train=train, val=val, test=test, root=SHARED))
    return path


def study_setup(
    doc: str, name: str, parts: list[str], split: tuple[float, float, float]
) -> tuple[argparse.Namespace, Path] | None:
    """Parse a study's command line (`--steps`, `--out` default /tmp/NAME, `--only` one of
    `parts`), create the output folder and write the spec over the three sets in it, split by case
    train/val/test = `split`. Returns (args, spec path); None, after saying so, when ../shared/data
    is absent."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--out", type=Path, default=Path("/tmp") / name)
    p.add_argument("--only", choices=parts)
    args = p.parse_args()
    if not SHARED.is_dir():
        print(f"{SHARED} is absent: this study reads the in-house data beside the project")
        return None
    args.out.mkdir(parents=True, exist_ok=True)
    return args, write_spec(args.out / "spec.yaml", name, *split)


def study_overrides(spec: Path, store: Path) -> list[str]:
    """Recipe overrides every study arm starts from: test-tiny from random init at 256 px (a CPU
    budget), batch 4, fixed seed, fp32, held-out Dice on the test split."""
    return ["model.variant=test-tiny", "model.image_size=256", f"data.spec={spec}",
            f"data.store={store}", "train.batch_size=4", "train.lr=0.0005",
            "train.warmup_steps=20", "train.mixed_precision=no", "train.seed=0",
            "train.tensorboard=false", "eval.split=test"]  # fmt: skip
