import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samed2_kit.medbank.preprocess import normalize_intensity, to_model_input
from samed2_kit.model import Prompts
from samed2_kit.model.predictor import Predictor

H, W = 180, 240  # any size, not square


def _image(kind):
    rng = np.random.default_rng(0)
    if kind == "grey-uint8":
        return rng.integers(0, 256, (H, W), dtype=np.uint8)
    if kind == "rgb-uint8":
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    if kind == "uint16":
        return rng.integers(0, 4096, (H, W), dtype=np.uint16)
    if kind == "ct-hu":
        return rng.normal(0, 300, (H, W)).astype(np.float32)
    return rng.random((H, W), dtype=np.float32)


@pytest.mark.parametrize("kind", ["grey-uint8", "rgb-uint8", "uint16", "ct-hu", "float01"])
def test_set_image_any_dtype_and_original_size_masks(tiny_model, kind):
    pred = Predictor(tiny_model)
    modality = "ct" if kind == "ct-hu" else "auto"
    pred.set_image(_image(kind), modality=modality)
    masks, scores, low = pred.predict(box=[30, 40, 150, 120], multimask_output=True)
    assert masks.shape == (3, H, W) and masks.dtype == bool
    assert scores.shape == (3,)
    assert low.shape == (3, 64, 64)
    masks, scores, low = pred.predict(
        point_coords=[[100, 90]], point_labels=[1], multimask_output=False
    )
    assert masks.shape == (1, H, W) and scores.shape == (1,)


def test_prompt_kinds_and_batched_boxes(tiny_model):
    pred = Predictor(tiny_model)
    pred.set_image(_image("rgb-uint8"))
    _, _, low = pred.predict(box=[30, 40, 150, 120], multimask_output=False)
    m, s, l2 = pred.predict(
        point_coords=[[100, 90], [10, 10]], point_labels=[1, 0], box=[30, 40, 150, 120],
        mask_input=low, multimask_output=False,
    )  # fmt: skip
    assert m.shape == (1, H, W) and l2.shape == (1, 64, 64)
    masks, scores, low = pred.predict(
        box=[[30, 40, 150, 120], [0, 0, 60, 60]], multimask_output=True
    )
    assert masks.shape == (2, 3, H, W) and scores.shape == (2, 3) and low.shape == (2, 3, 64, 64)
    logits, _, _ = pred.predict(box=[30, 40, 150, 120], return_logits=True, multimask_output=False)
    assert logits.dtype == np.float32


def test_embedding_is_cached(tiny_model):
    pred = Predictor(tiny_model)
    calls = []
    hook = tiny_model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    pred.set_image(_image("grey-uint8"))
    for box in ([30, 40, 150, 120], [0, 0, 100, 100], [50, 50, 60, 60]):
        pred.predict(box=box)
    hook.remove()
    assert len(calls) == 1 and pred.encoder_calls == 1


def test_matches_a_direct_model_call(tiny_model):
    """The predictor is the wrapper plus coordinate scaling and resizing, nothing else."""
    image = _image("grey-uint8")
    pred = Predictor(tiny_model)
    pred.set_image(image)
    box = np.array([30.0, 40, 150, 120])
    logits, scores, _ = pred.predict(box=box, multimask_output=False, return_logits=True)
    x = to_model_input(normalize_intensity(image), 256)[None]
    scaled = torch.tensor(box * [256 / W, 256 / H, 256 / W, 256 / H], dtype=torch.float32)[None]
    with torch.no_grad():
        out = tiny_model(x, Prompts(boxes=scaled))
    full = F.interpolate(out.low_res_logits, (H, W), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(logits, full[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(scores, out.iou[0].numpy(), atol=1e-6)


def test_clear_errors(tiny_model):
    pred = Predictor(tiny_model)
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict(box=[0, 0, 10, 10])
    pred.set_image(_image("grey-uint8"))
    with pytest.raises(ValueError, match="outside the 240x180"):
        pred.predict(box=[0, 0, 300, 10])
    with pytest.raises(ValueError, match="outside"):
        pred.predict(point_coords=[[-5, 10]], point_labels=[1])
    with pytest.raises(ValueError, match="at least one prompt"):
        pred.predict()
    with pytest.raises(ValueError, match="point_labels given without point_coords"):
        pred.predict(point_labels=[1], box=[0, 0, 10, 10])
    with pytest.raises(ValueError, match="2 point_coords but 1"):
        pred.predict(point_coords=[[5, 10], [6, 6]], point_labels=[1])
    with pytest.raises(ValueError, match=r"\(1, 64, 64\)"):
        pred.predict(mask_input=np.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="volume"):
        pred.set_image(np.zeros((4, 32, 32, 3)))


def test_predict_does_not_change_the_model(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    tiny_model.train()
    pred = Predictor(tiny_model)
    pred.set_image(_image("rgb-uint8"))
    pred.predict(box=[30, 40, 150, 120])
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k])
