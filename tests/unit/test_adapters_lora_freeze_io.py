"""LoRA presets, the freeze policy and adapter-only checkpoints, on the CPU test-tiny model."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from samed2_kit.adapters import freeze, io, lora
from samed2_kit.model import Prompts, build_model

BOXES = torch.tensor([[30.0, 40.0, 150.0, 200.0], [10.0, 10.0, 100.0, 120.0]])


def fresh(seed: int = 0, image_size: int = 256):
    torch.manual_seed(seed)
    return build_model("test-tiny", image_size=image_size)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))


def run(model, images, clip_len=1):
    return model(images, Prompts(boxes=BOXES.repeat(len(images) // 2, 1)), clip_len=clip_len)


def infer(model, images, clip_len=1):
    with torch.no_grad():
        return run(model.eval(), images, clip_len).low_res_logits


def loss_of(model, images, sign=1.0, clip_len=1):
    out = run(model, images, clip_len)
    return sign * out.low_res_logits.mean() + out.iou.mean() + out.object_score_logits.mean()


def sgd(model, images, pattern, steps=3, lr=0.5, sign=1.0, clip_len=1):
    params = [p.requires_grad_(True) for n, p in model.named_parameters() if re.search(pattern, n)]
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        loss_of(model, images, sign, clip_len).backward()
        opt.step()


def test_presets_wrap_expected_modules():
    plain, ours = fresh(), ("image_encoder.", "sam_mask_decoder.")
    linear = [n for n, m in plain.sam.named_modules() if isinstance(m, nn.Linear)]
    # qkv + proj per Hiera block; q/k/v/out of 3 attentions x 2 layers + the final one; all Linear
    expected = {"encoder-attn": 2 * 5, "decoder-attn": 4 * 7, "all-linear": 73}
    assert len(plain.encoder_blocks) == 5 and sum(n.startswith(ours) for n in linear) == 73
    for preset, count in expected.items():
        model = fresh()
        assert lora.inject_lora(model, lora.LoraSpec(preset=preset)) == count
        names = [n for n, m in model.sam.named_modules() if hasattr(m, "base_layer")]
        assert len(names) == count  # and never a memory module:
        assert all(n.startswith(ours) for n in names)
        n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        base = dict(plain.sam.named_modules())  # rank 8: r * (in + out) per wrapped Linear
        assert n_lora == sum(8 * (base[n].in_features + base[n].out_features) for n in names)
    model = fresh()  # a preset or regex that matches nothing, or matches a non-Linear:
    with pytest.raises(ValueError, match="matches no module"):
        lora.inject_lora(model, lora.LoraSpec(preset=r"no\.such\.module"))
    with pytest.raises(ValueError, match="not nn.Linear"):
        lora.inject_lora(model, lora.LoraSpec(preset=r"memory_encoder\.fuser\.proj"))
    with pytest.raises(ValueError, match="method"):
        lora.LoraSpec(method="vera")
    assert lora.lora_sets(model) == []


@pytest.mark.parametrize("method", lora.METHODS)
def test_identity_at_init_then_training_changes_output(images, method):
    model = fresh()
    y0 = infer(model, images)
    lora.inject_lora(model, lora.LoraSpec(method=method))
    assert type(model.sam).__name__ == "SAM2Base"
    assert torch.equal(infer(model, images), y0)
    sgd(model, images, lora.PEFT_PARAM_PATTERN)
    assert (infer(model, images) - y0).abs().max() > 1e-5


def test_merge_equals_unmerged_and_skips_adapter_compute(images):
    model = fresh()
    base_hash = io.base_weights_hash(model)
    lora.inject_lora(model, lora.LoraSpec(preset="all-linear"))
    assert io.base_weights_hash(model) == base_hash  # peft's base_layer renaming undone
    assert io.base_weights_hash(fresh(seed=1)) != base_hash
    sgd(model, images, lora.PEFT_PARAM_PATTERN)
    y = infer(model, images)
    qkv = model.sam.image_encoder.trunk.blocks[0].attn.qkv
    w0 = qkv.base_layer.weight.detach().clone()
    calls = []
    for n, m in model.sam.named_modules():
        if re.search(r"\.lora_[AB]\.default$", n):
            m.register_forward_hook(lambda *a: calls.append(1))
    assert lora.merge_lora(model) == 73 and lora.is_merged(model)
    assert not torch.equal(qkv.base_layer.weight, w0)
    torch.testing.assert_close(infer(model, images), y, atol=1e-5, rtol=0)
    assert calls == []  # merged: no adapter module runs
    with pytest.raises(ValueError, match="unmerge_lora"):
        io.base_weights_hash(model)
    assert lora.unmerge_lora(model) == 73 and not lora.is_merged(model)
    torch.testing.assert_close(qkv.base_layer.weight, w0, atol=1e-6, rtol=0)
    infer(model, images)
    assert calls  # unmerged: adapters run again


def test_two_named_sets_switch(images):
    model = fresh()
    y0 = infer(model, images)
    lora.inject_lora(model, lora.LoraSpec(), adapter_name="ct")
    sgd(model, images, r"\.lora_\w+\.ct\.")
    y_ct = infer(model, images)
    lora.inject_lora(model, lora.LoraSpec(rank=4), adapter_name="mr")
    assert lora.active_lora(model) == "mr"
    torch.testing.assert_close(infer(model, images), y0, atol=1e-6, rtol=0)  # mr starts at zero
    sgd(model, images, r"\.lora_\w+\.mr\.", sign=-1.0)
    y_mr, flags = infer(model, images), [p.requires_grad for p in model.parameters()]
    lora.set_active_lora(model, "ct")
    torch.testing.assert_close(infer(model, images), y_ct, atol=1e-6, rtol=0)
    lora.set_active_lora(model, "mr")
    torch.testing.assert_close(infer(model, images), y_mr, atol=1e-6, rtol=0)
    assert (y_ct - y_mr).abs().max() > 1e-4
    assert flags == [p.requires_grad for p in model.parameters()]  # switching keeps them
    with pytest.raises(ValueError, match="no adapter set 'us'"):
        lora.set_active_lora(model, "us")
    with pytest.raises(ValueError, match="already has an adapter set"):
        lora.inject_lora(model, lora.LoraSpec(), adapter_name="ct")


def test_freeze_policy_gradients_follow_the_policy(images):
    model = fresh()
    lora.inject_lora(model, lora.LoraSpec())
    groups = freeze.apply_policy(model, freeze.FreezePolicy(train=["lora", "mask_decoder"]))
    loss_of(model.train(), images).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name  # frozen: no grad at all
    names = [n for n, _ in model.named_parameters() if n.startswith("sam.sam_mask_decoder.")]
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n} | set(names)
    assert any(".lora_" in n for n in trainable) and [g["name"] for g in groups] == ["default"]


def test_policy_patterns_lr_groups_and_errors():
    model = fresh()
    lora.inject_lora(model, lora.LoraSpec(preset="decoder-attn"))
    policy = freeze.FreezePolicy(
        train=["lora", "mask_decoder", r"sam_prompt_encoder\.point_embeddings"],
        lr_mult={"lora": 10.0, r"iou_prediction_head": 0.5},
    )
    groups = freeze.apply_policy(model, policy)
    ids = [id(p) for g in groups for p in g["params"]]  # a partition of the trainable params:
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    groups_of = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    mults = {g["name"]: g["lr_mult"] for g in groups}
    assert mults == {"lora": 10.0, "iou_prediction_head": 0.5, "default": 1.0}
    assert all(".lora_" in n for n in groups_of["lora"])
    assert all("iou_prediction_head" in n for n in groups_of["iou_prediction_head"])
    assert any("point_embeddings" in n for n in groups_of["default"])
    assert not any(n.startswith("sam.image_encoder.") for n in sum(groups_of.values(), []))

    for train, mult, match in [
        (["decodr"], {}, r"'decodr' matches no parameter.*image_encoder"),
        (["temporal_adapter"], {}, "'temporal_adapter' matches no parameter"),
        (["lora"], {"image_encoder": 0.1}, "match no trainable"),
        (["(unclosed"], {}, "valid regex"),
    ]:
        with pytest.raises(ValueError, match=match):
            freeze.apply_policy(model, freeze.FreezePolicy(train, mult))


def test_policy_for_mode_and_table():
    model = fresh()
    lora.inject_lora(model, lora.LoraSpec())
    policy = freeze.policy_for_mode(model, "decoder")
    assert policy.train == ["prompt_encoder", "mask_decoder", "lora"]
    freeze.apply_policy(model, policy)
    table, n_all = freeze.trainable_table(model), sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert re.fullmatch(rf"total\s+{n_train:,}\s+{n_all:,}\s+\S+%", table.splitlines()[-1])
    assert re.search(r"sam\.image_encoder\s+0 ", table) and re.search(r"LoRA.*13,696", table)


def test_save_load_round_trip(tmp_path, images):
    model = fresh()
    lora.inject_lora(model, lora.LoraSpec(rank=4, alpha=8.0), adapter_name="ct")
    sgd(model, images, lora.PEFT_PARAM_PATTERN)
    y = infer(model, images)
    io.save_adapters(model, tmp_path, name="ct", extra={"step": 3})
    assert io.list_adapter_sets(tmp_path) == ["ct"]
    saved = load_file(str(tmp_path / "adapters-ct.safetensors"))  # only adapter tensors:
    assert set(saved) == {n for n, _ in model.named_parameters() if ".lora_" in n}
    meta = json.loads((tmp_path / "adapters-ct.json").read_text())
    assert meta["adapters"]["lora"]["sets"]["ct"]["spec"]["rank"] == 4 and meta["extra"] == {
        "step": 3
    }
    assert (meta["variant"], meta["image_size"]) == ("test-tiny", 256)
    other = fresh()  # same seed: same base weights, no LoRA yet
    loaded = io.load_adapters(other, tmp_path, name="ct")
    assert loaded.injected["lora"] == ["ct"] and lora.active_lora(other) == "ct"
    torch.testing.assert_close(infer(other, images), y, atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match="hash"):
        io.load_adapters(fresh(seed=1), tmp_path, name="ct")
    io.load_adapters(fresh(seed=1), tmp_path, name="ct", strict_base=False)
    with pytest.raises(ValueError, match="image_size=256"):
        io.load_adapters(fresh(image_size=128), tmp_path, name="ct")
    meta["variant"] = "tiny"
    (tmp_path / "adapters-ct.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="variant='tiny'"):
        io.load_adapters(fresh(), tmp_path, name="ct")
    with pytest.raises(FileNotFoundError, match=r"\['ct'\]"):
        io.load_adapters(fresh(), tmp_path, name="mr")


def test_prompt_source_tensors_need_the_source(tmp_path):
    model = fresh()
    model.add_prompt_source("proto", nn.Linear(4, 4))
    io.save_adapters(model, tmp_path)
    saved = json.loads((tmp_path / "adapters-default.json").read_text())
    assert saved["prompt_sources"] == ["proto"] and saved["adapters"] == {}
    with pytest.raises(ValueError, match="add_prompt_source"):
        io.load_adapters(fresh(), tmp_path)
    with pytest.raises(ValueError, match="no adapters to save"):
        io.save_adapters(fresh(), tmp_path, name="none")


def test_temporal_and_lora_round_trip(tmp_path):
    temporal = pytest.importorskip("samed2_kit.adapters.temporal")
    clip = torch.randn(4, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    model = fresh()
    temporal.inject_temporal_adapters(model, temporal.TemporalAdapterConfig(rank=4, blocks=[1, 3]))
    lora.inject_lora(model, lora.LoraSpec(preset="decoder-attn"))
    sgd(model, clip, rf"{temporal.TEMPORAL_PATTERN}|{lora.PEFT_PARAM_PATTERN}", clip_len=2)
    y = infer(model, clip, clip_len=2)
    assert (y - infer(fresh(), clip, clip_len=2)).abs().max() > 1e-5
    io.save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / "adapters-default.json").read_text())
    assert meta["adapters"]["temporal"] == {"rank": 4, "kernel": 3, "blocks": [1, 3]}

    other = fresh()
    loaded = io.load_adapters(other, tmp_path)
    assert sorted(loaded.injected["temporal"].adapters) == [1, 3]
    assert loaded.injected["lora"] == ["default"]
    torch.testing.assert_close(infer(other, clip, clip_len=2), y, atol=1e-6, rtol=0)
    assert freeze.matching(other, "temporal_adapter")
