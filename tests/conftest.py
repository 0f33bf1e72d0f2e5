"""Shared fixtures: a seeded test-tiny model, the bundled sample data, ../shared/data if present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def tiny_model():
    """test-tiny at 256 px, random weights fixed by seed 0, eval mode."""
    from samed2_kit.model import build_model

    torch.manual_seed(0)
    return build_model("test-tiny", image_size=256).eval()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (it is beside the project only in-house)")
    return SHARED_DATA


def build_store(tmp_path_factory, name: str, spec_text: str) -> str:
    """Build a medbank store from a spec's YAML text in a fresh temporary folder; its path."""
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec

    folder = tmp_path_factory.mktemp(name)
    spec = folder / "spec.yaml"
    spec.write_text(spec_text)
    parsed, sha = load_spec(spec)
    build(parsed, folder / "store", sha, progress=False)
    return str(folder / "store")


@pytest.fixture(scope="session")
def hc18_store(tmp_path_factory) -> str:
    """A medbank store of 10 bundled HC18 images (000-009), split by case train 0.6 / val 0.2 /
    test 0.2."""
    root = REPO / "samed2_kit" / "sample_data" / "hc18"
    return build_store(
        tmp_path_factory,
        "hc18-store",
        "split: {train: 0.6, val: 0.2, test: 0.2}\n"
        "sources:\n"
        f"  - {{name: hc18, layout: pairs, root: '{root}', image: 'images/00{{id}}HC.png',\n"
        "     mask: 'masks/00{id}HC_Annotation.png', spacing_csv: pixel_size.csv,\n"
        "     modality: us, task: fetal_head, licence: CC-BY-4.0}\n",
    )


@pytest.fixture(scope="session")
def volume_store(tmp_path_factory) -> str:
    """The bundled brain MR volumes (tumour ROI) at 64 px, split by case 1 / 1, clip_radius 2:
    runs of up to 5 slices."""
    root = REPO / "samed2_kit" / "sample_data" / "pyradiomics_brain"
    return build_store(
        tmp_path_factory,
        "volumes",
        "split: {train: 0.5, test: 0.5}\nclip_radius: 2\nmax_size: 64\nsources:\n"
        f"  - {{name: brain, layout: volumes, root: '{root}', image: '{{id}}_image.nrrd',\n"
        "     mask: '{id}_label.nrrd', labels: {1: tumour}, modality: mr, task: tumour,\n"
        "     licence: BSD-3-Clause}\n",
    )
