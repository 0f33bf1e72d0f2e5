"""Volume propagation (`samed2_kit.volume`): SAM 2's video path over the slices of a volume."""

import dataclasses

import numpy as np
import pytest
import torch

from samed2_kit.model.predictor import Predictor
from samed2_kit.prompts import Prompt
from samed2_kit.volume import model_clip_len, propagate_volume, volume_intensity
from tests._propagation import propagating_model

Z, H, W = 8, 40, 50
BOX = Prompt(box=np.array([5.0, 5, 30, 30]), points=np.array([[12.0, 14]]), labels=[1])


def _model(present=True):
    return propagating_model(64, present)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def vol():
    return (np.random.default_rng(0).random((Z, H, W)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def base(model, vol):
    """The default propagation from a box + click on slice 3."""
    return propagate_volume(model, vol, {3: BOX})


def _spy(model, monkeypatch, name):
    calls, real = [], getattr(model, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, name, spy)
    return calls


def test_shape_dtype_determinism_and_the_prompted_slice_equals_the_predictor(model, vol, base):
    assert base.shape == (Z, H, W) and base.dtype == bool
    assert all(base[z].any() for z in range(Z))  # every slice got a result
    # deterministic, and the encoder batch (clips per call) changes nothing
    assert np.array_equal(base, propagate_volume(model, vol, {3: BOX}, batch=1))
    pred = Predictor(model)
    pred.set_image(vol[3])  # uint8: normalisation does not depend on the other slices
    masks, _, _ = pred.predict(BOX.points, BOX.labels, BOX.box, multimask_output=False)
    assert np.array_equal(base[3], masks[0])


def test_propagation_uses_memory_and_a_dict_prompt_works(model, vol, base):
    no_memory = propagate_volume(model, vol, {3: vars(BOX)}, memory_frames=0)
    assert np.array_equal(base[3], no_memory[3])
    assert all(not np.array_equal(base[z], no_memory[z]) for z in (2, 4, 7))
    # memory_frames=0: each slice decoded alone and unprompted, whatever the prompted slice is
    other = propagate_volume(model, vol, {3: {"mask": np.ones((H, W), bool)}}, memory_frames=0)
    assert np.array_equal(np.delete(other, 3, 0), np.delete(no_memory, 3, 0))


def test_directions_and_stop_after_empty(model, vol, base, monkeypatch):
    up = propagate_volume(model, vol, {3: BOX}, direction="up")
    down = propagate_volume(model, vol, {3: BOX}, direction="down")
    assert not up[:3].any() and np.array_equal(up[3:], base[3:])
    assert not down[4:].any() and np.array_equal(down[:4], base[:4])
    plain = _model(present=False)  # its object score says "no object" on these slices
    decodes = _spy(plain, monkeypatch, "decode")
    out = propagate_volume(plain, vol, {3: BOX}, stop_after_empty=2)
    assert len(decodes) == 1 + 2 + 2 and not np.delete(out, 3, 0).any()


def test_two_prompts_each_slice_comes_from_the_nearer_ones_pass(model, vol):
    empty, full = {"mask": np.zeros((H, W), bool)}, {"mask": np.ones((H, W), bool)}
    both = propagate_volume(model, vol, {1: empty, 5: full}, batch=1)
    only1 = propagate_volume(model, vol, {1: empty}, batch=1)
    only5 = propagate_volume(model, vol, {5: full}, batch=1)
    assert np.array_equal(both[5], full["mask"]) and not both[1].any()
    # slices 0-3 are 1's pass (3: a tie, the lower prompt wins), 4, 6 and 7 are 5's
    assert np.array_equal(both[:4], only1[:4])
    assert np.array_equal(both[[4, 6, 7]], only5[[4, 6, 7]])
    assert not np.array_equal(both[[4, 6, 7]], only1[[4, 6, 7]])
    # one direction: a pass runs up to the next prompted slice
    up = propagate_volume(model, vol, {1: empty, 5: full}, direction="up", batch=1)
    assert not up[0].any() and np.array_equal(up[1:5], only1[1:5])
    assert np.array_equal(up[6:], only5[6:])


def test_temporal_adapters_encode_clips_of_t(vol, monkeypatch):
    from samed2_kit.adapters.temporal import TemporalAdapterConfig, inject_temporal_adapters

    m = _model()
    handle = inject_temporal_adapters(m, TemporalAdapterConfig(rank=4))
    with torch.no_grad():  # non-zero up-projections: the slices of a clip do mix
        for a in handle.adapters.values():
            a.up.weight.normal_(0, 0.1)
    assert model_clip_len(m) == 1  # built for 2D: T = 1 unless the spec says otherwise
    m.spec = dataclasses.replace(m.spec, clip_len=3)
    assert model_clip_len(m) == 3
    encodes = _spy(m, monkeypatch, "encode")
    out = propagate_volume(m, vol, {3: BOX}, batch=2)
    assert out.shape == (Z, H, W)
    # 8 slices -> 3 clips of 3 (the last padded: 6, 7, 7), 2 clips per call, each encoded once
    assert {kw["clip_len"] for _, kw in encodes} == {3}
    assert sum(args[0].shape[0] for args, _ in encodes) == 9
    assert all(args[0].shape[0] % 3 == 0 for args, _ in encodes)
    clips = torch.cat([args[0] for args, _ in encodes]).reshape(3, 3, 3, 64, 64)
    assert sum(torch.equal(c[2], c[1]) for c in clips) == 1  # only the padded clip repeats
    assert np.array_equal(out, propagate_volume(m, vol, {3: BOX}, clip_len=3))
    assert not np.array_equal(out, propagate_volume(m, vol, {3: BOX}, clip_len=1))


def test_confidence_memory_is_read_never_written(vol, monkeypatch):
    from samed2_kit.memory import MemoryConfig, attach_memory
    from samed2_kit.model import Prompts

    m = _model()
    mem = attach_memory(m, MemoryConfig(threshold=0.0, top_k=2))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(x, Prompts(boxes=torch.tensor([[5.0, 5, 40, 40], [10, 10, 50, 50]])))
        entries = mem.entries_from(m.sam, out, {"case_id": ["a", "a"], "task": ["t", "t"]}, 1)
    mem.writing = True
    assert mem.commit([entries]) == {"inserted": 2}
    mem.writing = False
    before = mem.bank.digest()
    m.train()
    m.sam.image_encoder.eval()  # a mixed state, restored as it was
    flags = [mod.training for mod in m.modules()]
    decodes = _spy(m, monkeypatch, "decode")
    with_bank = propagate_volume(m, vol, {3: BOX})
    assert [mod.training for mod in m.modules()] == flags
    assert mem.bank.digest() == before and len(mem.bank) == 2
    assert [kw.get("use_memory", True) for _, kw in decodes] == [True] + [False] * (Z - 1)
    assert all(args[1].empty() for args, _ in decodes[1:])  # propagated slices: no prompt
    m.memory = None
    assert not np.array_equal(with_bank, propagate_volume(m.eval(), vol, {3: BOX}))


def test_volume_intensity_uses_statistics_of_the_whole_volume():
    rng = np.random.default_rng(0)
    mr = rng.integers(0, 1000, (3, 8, 8)).astype(np.int16)
    mr[0] //= 10  # a dark slice stays dark
    f = volume_intensity(mr, "mr")
    lo, hi = np.percentile(mr, (0.5, 99.5))
    assert np.allclose(f(0), np.clip((mr[0] - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert f(0).max() < 0.2 and f(1).max() == 1.0 and f(0).dtype == np.float32
    ct = np.full((2, 4, 4), -1000, np.int16)
    ct[1] = 40
    g = volume_intensity(ct, "auto")  # HU: the default soft-tissue window (40, 400)
    assert (g(0) == 0).all() and np.allclose(g(1), 0.5)
    assert np.allclose(volume_intensity(ct, window=(40, 80))(1), 0.5)
    # the same rules as normalize_intensity on the volume taken as one (Z * H, W) image
    from samed2_kit.medbank.preprocess import normalize_intensity

    for v in (rng.integers(0, 4000, (3, 8, 8)).astype(np.uint16), rng.normal(0, 300, (3, 8, 8))):
        flat = normalize_intensity(v.reshape(-1, 8))[..., 0].reshape(v.shape)
        assert all(np.array_equal(volume_intensity(v)(z), flat[z]) for z in range(3))


def test_a_medbank_volume_is_accepted(model, vol, base):
    from samed2_kit.medbank.io.volume import Volume

    v = Volume(vol, (2.0, 1.0, 1.0), meta={"modality": "OT"})
    assert np.array_equal(propagate_volume(model, v, {3: BOX}), base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": {8: BOX}}, r"slice index 8 is not in 0\.\.7"),
        ({"prompts": {-1: BOX}}, r"slice index -1 is not in"),
        ({"prompts": {}}, "prompts is empty"),
        ({"prompts": {3: Prompt()}}, r"prompts\[3\] is empty"),
        ({"prompts": {3: {"points": np.zeros((0, 2))}}}, r"prompts\[3\] is empty"),
        ({"prompts": {3: {"box": [0, 0, 51, 10]}}}, r"prompts\[3\]\.box .* outside the 50x40"),
        ({"prompts": {3: {"points": [[5, 41]], "labels": [1]}}}, r"prompts\[3\]\.points"),
        (
            {"prompts": {3: {"box": [0, 0, 5, 5], "labels": [1]}}},
            r"prompts\[3\]\.labels given without points",
        ),
        ({"prompts": {3: {"mask": np.ones((H, W + 1), bool)}}}, r"prompts\[3\]\.mask is"),
        ({"prompts": {3: {"spot": 1}}}, "unknown keys"),
        ({"direction": "sideways"}, "direction='sideways'"),
        ({"memory_frames": -1}, "memory_frames=-1"),
        ({"volume": np.zeros((H, W), np.uint8)}, r"volume must be \(Z, H, W\)"),
        ({"volume": np.zeros((Z, H, W, 3), np.uint8)}, r"volume must be \(Z, H, W\)"),
    ],
)
def test_errors_name_the_field_and_the_fix(model, vol, kwargs, match):
    args = {"volume": vol, "prompts": {3: BOX}, **kwargs}
    with pytest.raises(ValueError, match=match):
        propagate_volume(model, args.pop("volume"), args.pop("prompts"), **args)
