"""Temporal adapter: exact block replica, identity at init, real slice mixing, checkpoints, errors."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

from samed2_kit.adapters.temporal import (
    TEMPORAL_PATTERN,
    TemporalAdapter,
    TemporalAdapterConfig,
    inject_temporal_adapters,
    temporal_parameter_names,
)
from samed2_kit.model import Prompts, build_model
from samed2_kit.model._sam2 import hiera_block_forward
from samed2_kit.model.build import load_checkpoint, save_meta_checkpoint

S = 256


def _model(variant: str = "test-tiny", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(variant, image_size=S).eval()


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _encode(model, images, clip_len):
    with torch.no_grad():
        f = model.encode(images, clip_len=clip_len)
    return [f.image_embed, *f.high_res]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor], rows=slice(None)) -> float:
    return max((x[rows] - y[rows]).abs().max().item() for x, y in zip(a, b, strict=True))


def _perturb(handle, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in handle.adapters.values():
            a.up.weight.copy_(0.2 * torch.randn(a.up.weight.shape, generator=g))
            a.up.bias.copy_(0.2 * torch.randn(a.up.bias.shape, generator=g))


@pytest.mark.parametrize("variant", ["test-tiny", "tiny"])
def test_block_forward_replica_equals_sam2(variant):
    model = _model(variant)
    blocks = model.encoder_blocks
    kinds = {"window": 0, "global": 0, "q-pool": 0}
    x = torch.randn(2, S // 4, S // 4, blocks[0].dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for block in blocks:
            kinds["global" if block.window_size == 0 else "window"] += 1
            kinds["q-pool"] += bool(block.q_stride)
            ours = hiera_block_forward(block, x)
            assert torch.equal(ours, block(x))
            assert torch.equal(hiera_block_forward(block, x, after_attn=lambda y: y), ours)
            x = ours
    assert all(kinds.values()), kinds  # every kind of block was exercised


@pytest.mark.parametrize("clip_len", [1, 2, 3])
def test_identity_at_init(clip_len):
    model = _model()
    plain = {n: _encode(model, _images(n * clip_len), clip_len) for n in (1, 2, 3, 5)}
    handle = inject_temporal_adapters(model, TemporalAdapterConfig())
    assert len(handle.adapters) == len(model.encoder_blocks)
    for n, ref in plain.items():
        assert _max_diff(_encode(model, _images(n * clip_len), clip_len), ref) <= 1e-6


def test_identity_at_init_tiny():
    model = _model("tiny")
    images = _images(4)
    ref = _encode(model, images, 2)
    inject_temporal_adapters(model)
    assert _max_diff(_encode(model, images, 2), ref) <= 1e-6


# Each kind of block alone must mix slices: window 8, q-pool + window 8, global (test-tiny).
@pytest.mark.parametrize("blocks", [None, [0], [1], [3]])
def test_temporal_axis_mixes_slices_within_a_clip_only(blocks):
    model = _model()
    handle = inject_temporal_adapters(model, TemporalAdapterConfig(blocks=blocks))
    _perturb(handle)
    T, images = 3, _images(6)  # clips 0 (rows 0-2) and 1 (rows 3-5)
    changed = images.clone()
    changed[1] += 1.0  # clip 0, slice t-1 = 1
    a, b = _encode(model, images, T), _encode(model, changed, T)
    assert _max_diff(a, b, rows=2) > 1e-3  # slice t = 2 of the same clip sees it
    assert _max_diff(a, b, rows=slice(3, 6)) <= 1e-6  # the other clip does not
    # T = 1: every image is its own clip, nothing mixes.
    a, b = _encode(model, images, 1), _encode(model, changed, 1)
    assert _max_diff(a, b, rows=2) <= 1e-6 < _max_diff(a, b, rows=1)
    # Removed, slices are independent again.
    handle.remove()
    assert _max_diff(_encode(model, images, T), _encode(model, changed, T), rows=2) <= 1e-6


def test_gradients_reach_every_adapter_parameter():
    model = _model()
    handle = inject_temporal_adapters(model)
    model.train()
    T = 2
    images = _images(2 * T)
    boxes = torch.tensor([[40.0, 50.0, 180.0, 200.0]]).expand(2 * T, 4)

    def backward():
        model.zero_grad(set_to_none=True)
        out = model(images, Prompts(boxes=boxes), clip_len=T)
        (out.low_res_logits.mean() + out.iou.mean()).backward()

    backward()
    for a in handle.adapters.values():
        assert all(p.grad is not None for p in a.parameters())
        assert a.up.weight.grad.abs().sum() > 0  # zero up-projection: only it learns at step 0
    _perturb(handle)
    backward()
    for i, a in handle.adapters.items():
        for name, p in a.named_parameters():
            assert p.grad.abs().sum() > 0, f"block {i} {name} got a zero gradient"


def test_state_dict_keys_and_meta_checkpoint(tmp_path):
    plain = _model(seed=1)
    base_keys = set(plain.state_dict())
    path = save_meta_checkpoint(plain.sam, tmp_path / "meta.pt")

    model = _model()
    handle = inject_temporal_adapters(model)
    keys = set(model.state_dict())
    added = keys - base_keys
    assert base_keys <= keys
    assert added and all(
        re.fullmatch(r"sam\.image_encoder\.trunk\.blocks\.\d+\.temporal_adapter\..+", k)
        for k in added
    )
    names = temporal_parameter_names(model)
    assert set(names) == added  # the adapters hold no buffers
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) == (
        handle.num_parameters()
    )
    assert all(re.search(TEMPORAL_PATTERN, n) for n in names)

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    assert added <= set(torch.load(buf, weights_only=True))

    report = load_checkpoint(model.sam, path, variant="test-tiny")
    assert report.unexpected == []
    assert {"sam." + k for k in report.missing} == added
    images = _images(4)
    assert _max_diff(_encode(model, images, 2), _encode(plain, images, 2)) <= 1e-6

    # And the reverse: adapter keys are the only extra keys for a plain model.
    save_meta_checkpoint(model.sam, tmp_path / "adapted.pt")
    report = load_checkpoint(plain.sam, tmp_path / "adapted.pt")
    assert report.missing == [] and {"sam." + k for k in report.unexpected} == added


def test_remove_restores_the_plain_model():
    model = _model()
    images = _images(4)
    ref, keys = _encode(model, images, 2), set(model.state_dict())
    handle = inject_temporal_adapters(model, TemporalAdapterConfig(blocks=[1, 3]))
    assert sorted(handle.adapters) == [1, 3]
    assert all(".blocks.1." in n or ".blocks.3." in n for n in temporal_parameter_names(model))
    _perturb(handle)
    assert _max_diff(_encode(model, images, 2), ref) > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    assert set(model.state_dict()) == keys
    assert all("forward" not in b.__dict__ for b in model.encoder_blocks)
    assert _max_diff(_encode(model, images, 2), ref) == 0.0
    inject_temporal_adapters(model)  # injecting again after remove is allowed


def test_deepcopy_rebinds_to_the_copy():
    model = _model()
    handle = inject_temporal_adapters(model)
    _perturb(handle)
    twin = copy.deepcopy(model)
    for block in twin.encoder_blocks:
        assert block.forward.args[0] is block and block.forward.args[1] is twin
    images = _images(4)
    assert _max_diff(_encode(twin, images, 2), _encode(model, images, 2)) == 0.0
    with torch.no_grad():
        for block in twin.encoder_blocks:
            block.temporal_adapter.up.weight.zero_()
            block.temporal_adapter.up.bias.zero_()
    assert _max_diff(_encode(twin, images, 2), _encode(model, images, 2)) > 1e-3


def test_errors():
    model = _model()
    depth = len(model.encoder_blocks)
    with pytest.raises(ValueError, match=rf"\[7\].*0\.\.{depth - 1}"):
        inject_temporal_adapters(model, TemporalAdapterConfig(blocks=[0, 7]))
    with pytest.raises(ValueError, match="blocks"):
        inject_temporal_adapters(model, TemporalAdapterConfig(blocks=[-1]))
    assert temporal_parameter_names(model) == []  # a failed injection left nothing behind
    inject_temporal_adapters(model)
    with pytest.raises(ValueError, match="already has temporal adapters"):
        inject_temporal_adapters(model)
    with pytest.raises(ValueError, match="clip_len=2"):
        model.encode(torch.zeros(5, 3, S, S), clip_len=2)
    adapter = TemporalAdapter(16, rank=4)
    with pytest.raises(ValueError, match=r"batch of 5 maps .* clip_len=2"):
        adapter(torch.zeros(5, 4, 4, 16), clip_len=2)
    with pytest.raises(ValueError, match=r"\(B\*T, h, w, 16\)"):
        adapter(torch.zeros(4, 4, 4, 8), clip_len=2)
    with pytest.raises(ValueError, match="kernel=2"):
        TemporalAdapterConfig(kernel=2)
    with pytest.raises(ValueError, match="rank=0"):
        TemporalAdapterConfig(rank=0)


def test_adapter_shapes_and_zero_init():
    adapter = TemporalAdapter(24, rank=8, kernel=3)
    y = torch.randn(6, 5, 7, 24)
    for T in (1, 2, 3, 6):
        assert torch.equal(adapter(y, T), y)
    assert sum(p.numel() for p in adapter.parameters()) == 24 * (3 + 2 * 8) + 27 * 8 * 8 + 2 * 8


def test_report_and_parameter_counts():
    model = _model()
    handle = inject_temporal_adapters(model)
    text = handle.report()
    rows = [line.split() for line in text.splitlines()[1:-1]]
    assert [int(r[0]) for r in rows] == list(range(len(model.encoder_blocks)))
    assert "global" in text and "q-pool" in text and "window" in text
    total = handle.num_parameters()
    dims = [b.dim_out for b in model.encoder_blocks]
    assert total == sum(67 * c + 27 * 32 * 32 + 64 for c in dims)  # rank 32, kernel 3
    assert f"total: {total:,}" in text and "%" in text
