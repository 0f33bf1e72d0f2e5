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
