"""Meta's SAM 2.1 variants built at full size (random weights): parameter counts and recognition
from a state dict. The two large ones (base_plus, large) are in the slow tier; the configs of all
four are checked without building in tests/unit/test_build.py."""

import pytest

from samed2_kit.model import build_model
from samed2_kit.model.build import guess_variant


# Parameter counts of Meta's SAM 2.1 models (M): tiny 38.9, small 46.0, base_plus 80.8, large 224.4
@pytest.mark.parametrize(
    "variant, millions",
    [
        ("tiny", 38.9),
        ("small", 46.0),
        pytest.param("base_plus", 80.8, marks=pytest.mark.slow),
        pytest.param("large", 224.4, marks=pytest.mark.slow),
    ],
)
def test_meta_variants_build_and_are_recognised(variant, millions):
    m = build_model(variant, image_size=256)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - millions) < 0.1
    assert guess_variant(m.sam.state_dict()) == variant
