"""The real 2D sets in ../shared/data that the studies read (in-house only; see its MANIFEST.md):
fetal head (HC18, ultrasound), breast lesion (BUSI, ultrasound), polyp (Kvasir-SEG, endoscopy)."""

from __future__ import annotations

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
