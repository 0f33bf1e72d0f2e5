import pytest
import torch
from torch import nn

from samed2_kit.engine.train import apply_train_mode
from samed2_kit.model import PromptContribution, Prompts
from samed2_kit.model._sam2 import ImageFeatures
from tests._reference import direct_sam2

S = 256


def _batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, S, S, generator=g)
    boxes = torch.tensor([[20.0, 30, 120, 140], [60, 50, 200, 230], [5, 5, 50, 50]])[:b]
    points = torch.tensor([[[70.0, 80], [10, 10]], [[100, 120], [250, 250]], [[20, 20], [0, 0]]])[
        :b
    ]
    labels = torch.tensor([[1, 0], [1, 0], [1, -1]])[:b]
    masks = torch.randn(b, 1, S // 4, S // 4, generator=g)
    return images, boxes, points, labels, masks


@pytest.mark.parametrize("multimask", [False, True])
def test_forward_equals_direct_sam2_calls(tiny_model, multimask):
    images, boxes, *_ = _batch()
    with torch.no_grad():
        out = tiny_model(images, Prompts(boxes=boxes), multimask_output=multimask)
        masks, iou, obj = direct_sam2(tiny_model.sam, images, boxes, multimask)
    assert torch.equal(out.low_res_logits, masks)
    assert torch.equal(out.iou, iou)
    assert torch.equal(out.object_score_logits, obj)


@pytest.mark.parametrize("kind", ["box", "points", "mask", "box+points+mask"])
def test_forward_shapes_for_each_prompt_kind(tiny_model, kind):
    images, boxes, points, labels, masks = _batch(3)
    p = Prompts(
        boxes=boxes if "box" in kind else None,
        points=points if "points" in kind else None,
        point_labels=labels if "points" in kind else None,
        masks=masks if "mask" in kind else None,
    )
    for multimask, m in ((False, 1), (True, 3)):
        out = tiny_model(images, p, multimask_output=multimask)
        assert out.low_res_logits.shape == (3, m, S // 4, S // 4)
        assert out.iou.shape == (3, m)
        assert out.object_score_logits.shape == (3, 1)
        assert ((out.iou >= 0) & (out.iou <= 1)).all()


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        tiny_model(torch.zeros(1, 3, 128, 128), Prompts(boxes=torch.zeros(1, 4)))
    with pytest.raises(ValueError, match="not a multiple of clip_len=2"):
        tiny_model(torch.zeros(3, 3, S, S), Prompts(boxes=torch.zeros(3, 4)), clip_len=2)
    with pytest.raises(ValueError, match="points and point_labels together"):
        Prompts(points=torch.zeros(1, 1, 2))


@pytest.mark.parametrize("mode", ["full", "decoder"])
def test_gradients_reach_what_trains(tiny_model, mode):
    apply_train_mode(tiny_model, mode)
    tiny_model.train()
    images, boxes, points, labels, _ = _batch()
    out = tiny_model(images, Prompts(points, labels, boxes))
    (out.low_res_logits.mean() + out.iou.mean() + out.object_score_logits.mean()).backward()
    grads = {n: p.grad for n, p in tiny_model.sam.named_parameters()}
    enc = [g for n, g in grads.items() if n.startswith("image_encoder.trunk")]
    dec = [g for n, g in grads.items() if n.startswith("sam_mask_decoder.transformer")]
    assert all(g is not None and g.abs().sum() > 0 for g in dec)
    if mode == "full":
        assert sum(g is not None and g.abs().sum() > 0 for g in enc) > 0.9 * len(enc)
    else:
        assert all(g is None for g in enc)
    assert all(grads[n] is None for n in grads if n.startswith("memory_attention"))


def test_encoder_seam_sees_clip_length(tiny_model):
    seen = []
    hook = tiny_model.encoder_blocks[0].register_forward_hook(
        lambda mod, inp, out: seen.append((tiny_model.clip.clip_len, out.shape[0]))
    )
    images = torch.randn(6, 3, S, S)
    tiny_model(images, Prompts(boxes=torch.tensor([[10.0, 10, 90, 90]]).expand(6, 4)), clip_len=3)
    hook.remove()
    assert seen == [(3, 6)]
    assert tiny_model.clip.clip_len == 1  # restored after the encoder ran


class _Source(nn.Module):
    """A prompt source with its own weights: a dense map and mask logits from the image."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 1)
        self.to_mask = nn.Conv2d(dim, 1, 1)

    def forward(self, feats: ImageFeatures, prompts, ctx):
        e = feats.image_embed
        mask = nn.functional.interpolate(self.to_mask(e), scale_factor=4.0) * 5
        return PromptContribution(dense=self.proj(e), mask_logits=mask)


class _MemorySource(nn.Module):
    """Memory entries made from the image itself (two per image), through SAM 2 memory attention."""

    def forward(self, feats: ImageFeatures, prompts, ctx):
        from samed2_kit.model import _sam2

        e = feats.image_embed
        m = _sam2.memory_dim(ctx.sam)
        entry = e[:, :m].detach() * 0.5
        return PromptContribution(memory=torch.stack([entry, -entry], dim=1))


class _Clicker(nn.Module):
    """Suggests one positive click at a fixed place (what a few-shot source does)."""

    def forward(self, feats: ImageFeatures, prompts, ctx):
        b = feats.image_embed.shape[0]
        return PromptContribution(
            points=torch.tensor([[[70.0, 80.0]]]).expand(b, 1, 2),
            point_labels=torch.ones(b, 1, dtype=torch.long),
        )


def test_memory_contribution_is_identity_at_zero_gate_and_opens(tiny_model):
    images, boxes, *_ = _batch()
    p = Prompts(boxes=boxes)
    with torch.no_grad():
        plain = tiny_model(images, p)
        tiny_model.add_prompt_source("mem", _MemorySource())
        closed = tiny_model(images, p)
        tiny_model.source_gates["mem"].fill_(1.0)
        opened = tiny_model(images, p)
    assert torch.equal(closed.low_res_logits, plain.low_res_logits)
    assert not torch.allclose(opened.low_res_logits, plain.low_res_logits)


def test_suggested_clicks_prompt_only_when_the_caller_gives_none(tiny_model):
    images, boxes, points, labels, _ = _batch()
    with torch.no_grad():
        plain_box = tiny_model(images, Prompts(boxes=boxes))
        plain_click = tiny_model(images, Prompts(points=points[:, :1], point_labels=labels[:, :1]))
        tiny_model.add_prompt_source("clicks", _Clicker())
        with_box = tiny_model(images, Prompts(boxes=boxes))
        unprompted = tiny_model(images, Prompts())
    assert torch.equal(with_box.low_res_logits, plain_box.low_res_logits)  # the box wins
    # points[:, 0] is (70, 80) for image 0: the suggested click equals that user click there
    assert torch.equal(unprompted.low_res_logits[0], plain_click.low_res_logits[0])
    assert unprompted.prompts.points.shape == (2, 1, 2)


def test_support_images_share_the_encoder_pass(tiny_model):
    images, boxes, *_ = _batch()
    sup_images = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    sup_masks = torch.zeros(2, 1, S, S)
    sup_masks[:, :, 64:128, 64:128] = 1
    seen = {}

    class Spy(nn.Module):
        def forward(self, feats, prompts, ctx):
            seen["support"] = ctx.support
            return PromptContribution()

    tiny_model.add_prompt_source("spy", Spy())
    with torch.no_grad():
        tiny_model(images, Prompts(boxes=boxes), support_images=sup_images,
                   support_masks=sup_masks, support_index=torch.tensor([1, 0]))  # fmt: skip
        alone = tiny_model.encode(sup_images)
    sup = seen["support"]
    assert torch.allclose(sup.features.image_embed, alone.image_embed, atol=1e-5)
    assert sup.rows_for(0).tolist() == [1] and sup.rows_for(1).tolist() == [0]
    with pytest.raises(ValueError, match="support masks must be"):
        tiny_model(images, Prompts(boxes=boxes), support_images=sup_images,
                   support_masks=sup_masks[:, :, :128])  # fmt: skip


def test_prompt_source_seam_is_identity_at_init_and_trains(tiny_model):
    images, boxes, *_ = _batch()
    p = Prompts(boxes=boxes)
    with torch.no_grad():
        plain = tiny_model(images, p, multimask_output=True)
    tiny_model.add_prompt_source("demo", _Source(tiny_model.sam.hidden_dim))
    out = tiny_model(images, p, multimask_output=True)
    assert torch.equal(out.low_res_logits, plain.low_res_logits)
    assert torch.equal(out.iou, plain.iou)
    out.low_res_logits.square().mean().backward()
    assert tiny_model.source_gates["demo"].grad.abs() > 0
    with torch.no_grad():
        tiny_model.source_gates["demo"].fill_(1.0)
        opened = tiny_model(images, p, multimask_output=True)
    assert not torch.allclose(opened.low_res_logits, plain.low_res_logits)
    with pytest.raises(ValueError, match="already registered"):
        tiny_model.add_prompt_source("demo", _Source(tiny_model.sam.hidden_dim))


class _Memory(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.bias = nn.Parameter(torch.full((1, dim, 1, 1), 0.5))
        self.calls = []

    def condition(self, sam, feats: ImageFeatures, meta: dict) -> ImageFeatures:
        self.calls.append(meta)
        return ImageFeatures(feats.image_embed + self.bias, feats.high_res, feats.pos)


def test_memory_seam_conditions_the_embedding(tiny_model):
    images, boxes, *_ = _batch()
    p = Prompts(boxes=boxes)
    with torch.no_grad():
        plain = tiny_model(images, p)
    tiny_model.memory = _Memory(tiny_model.sam.hidden_dim)
    out = tiny_model(images, p, meta={"case_id": ["a", "b"]})
    assert tiny_model.memory.calls == [{"case_id": ["a", "b"]}]
    assert not torch.allclose(out.low_res_logits, plain.low_res_logits)
    out.low_res_logits.mean().backward()
    assert tiny_model.memory.bias.grad.abs().sum() > 0
