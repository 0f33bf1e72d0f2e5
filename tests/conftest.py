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


@pytest.fixture(scope="session")
def hc18_store(tmp_path_factory) -> str:
    """A medbank store of 10 bundled HC18 images (000-009), split by case train 0.6 / val 0.2 /
    test 0.2."""
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec

    folder = tmp_path_factory.mktemp("hc18-store")
    spec = folder / "spec.yaml"
    root = REPO / "samed2_kit" / "sample_data" / "hc18"
    spec.write_text(
        "split: {train: 0.6, val: 0.2, test: 0.2}\n"
        "sources:\n"
        f"  - {{name: hc18, layout: pairs, root: '{root}', image: 'images/00{{id}}HC.png',\n"
        "     mask: 'masks/00{id}HC_Annotation.png', spacing_csv: pixel_size.csv,\n"
        "     modality: us, task: fetal_head, licence: CC-BY-4.0}\n"
    )
    parsed, sha = load_spec(spec)
    build(parsed, folder / "store", sha, progress=False)
    return str(folder / "store")
