import pytest
import torch

from samed2_kit.config import load_recipe
from samed2_kit.engine.train import (
    apply_train_mode,
    cosine_with_warmup,
    resolve_mixed_precision,
    train,
)
from samed2_kit.model import build_model


def _recipe(*overrides):
    return load_recipe(
        None,
        [
            "model.image_size=128",
            "train.batch_size=2",
            "train.warmup_steps=2",
            "train.lr=0.001",
            "train.mixed_precision=no",
            *overrides,
        ],
    )


def test_cosine_schedule_with_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_mixed_precision_choice():
    assert resolve_mixed_precision("no") == "no"
    assert resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("auto") in ("no", "bf16", "fp16")
    with pytest.raises(ValueError, match="use auto, bf16, fp16 or no"):
        resolve_mixed_precision("fp8")


def test_train_modes_freeze_the_right_parameters():
    m = build_model("test-tiny", image_size=128)
    n_full = apply_train_mode(m, "full")
    n_dec = apply_train_mode(m, "decoder")
    enc = sum(p.numel() for p in m.sam.image_encoder.parameters())
    assert n_full - n_dec == enc + m.sam.no_mem_embed.numel()
    assert not any(p.requires_grad for p in m.sam.memory_attention.parameters())
    with pytest.raises(ValueError, match="train.mode='encoder'"):
        apply_train_mode(m, "encoder")


def test_training_lowers_the_loss_and_is_deterministic(hc18_store):
    def run():
        torch.manual_seed(0)
        m = build_model("test-tiny", image_size=128)
        _, result, _ = train(_recipe("train.steps=24"), m, hc18_store, progress=False)
        return [h.loss for h in result.history]

    a, b = run(), run()
    assert len(a) == 24
    assert a == b  # seeded data order, prompts, augmentation and init
    assert sum(a[-6:]) / 6 < sum(a[:6]) / 6


def test_decoder_mode_leaves_the_encoder_untouched_and_accumulates(hc18_store):
    torch.manual_seed(0)
    m = build_model("test-tiny", image_size=128)
    enc0 = {k: v.clone() for k, v in m.sam.image_encoder.state_dict().items()}
    dec0 = {k: v.clone() for k, v in m.sam.sam_mask_decoder.state_dict().items()}
    r = _recipe("train.steps=3", "train.mode=decoder", "train.grad_accum=2")
    m, result, _ = train(r, m, hc18_store, progress=False)
    assert len(result.history) == 3  # optimizer steps, each over 2 micro-batches
    assert all(torch.equal(v, enc0[k]) for k, v in m.sam.image_encoder.state_dict().items())
    assert any(not torch.equal(v, dec0[k]) for k, v in m.sam.sam_mask_decoder.state_dict().items())


def test_too_few_samples_is_a_clear_error(hc18_store):
    m = build_model("test-tiny", image_size=128)
    with pytest.raises(ValueError, match=r"fewer than one global batch \(train.batch_size=64 x 1"):
        train(_recipe("train.batch_size=64"), m, hc18_store, progress=False)


def test_param_groups_follow_the_policy_and_lr_multipliers():
    from samed2_kit.engine.train import param_groups
    from samed2_kit.model.assemble import add_adapters

    r = _recipe(
        "adapters.temporal={rank: 4}",
        "train.trainable=[temporal_adapter, mask_decoder]",
        "train.lr_mult={temporal_adapter: 10}",
    )
    m = build_model("test-tiny", image_size=128)
    add_adapters(m, r.adapters)
    groups, n = param_groups(m, r.train)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["temporal_adapter"] == pytest.approx(10 * r.train.lr)
    assert len(groups) == 2 and n == sum(p.numel() for p in m.parameters() if p.requires_grad)
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert all(".temporal_adapter." in k or ".sam_mask_decoder." in k for k in trainable)
    with pytest.raises(ValueError, match="decoderr"):
        param_groups(m, _recipe("train.trainable=[decoderr]").train)


def test_training_gives_the_temporal_adapters_whole_clips(hc18_store):
    from samed2_kit.adapters.temporal import TemporalAdapter, TemporalAdapterConfig
    from samed2_kit.model.assemble import add_adapters

    recipe = _recipe("train.steps=2", "data.clip_len=3")
    recipe.adapters["temporal"] = TemporalAdapterConfig()
    m = build_model("test-tiny", image_size=128)
    add_adapters(m, recipe.adapters)
    seen = []
    for module in m.modules():
        if isinstance(module, TemporalAdapter):
            module.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    train(recipe, m, hc18_store, progress=False)
    assert seen and set(seen) == {3}  # T=3 in every call (the loop once passed none: T=1)
