"""Sequence training (`train.step=sequence`): clips of N slices, the centre prompted, the others
propagated through SAM 2's memory path, the same code `propagate_volume` runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _recipe(store, *extra):
    from samed2_kit.config import load_recipe

    return load_recipe(None, [f"data.store={store}", "model.image_size=64", "data.sequence_len=5",
                              "train.step=sequence", "train.batch_size=2", "train.steps=3",
                              "train.warmup_steps=1", "train.lr=0.001", "train.mixed_precision=no",
                              "data.augment=false", *extra])  # fmt: skip


def _state(model, prefix):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize("step", ["sequence", "image"])
def test_sequence_training_trains_the_propagation_modules(volume_store, step):
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, f"train.step={step}")
    model = from_recipe(recipe)
    parts = ("sam.memory_attention.", "sam.memory_encoder.", "sam.obj_ptr", "sam.no_obj_ptr")
    before = {k: v for p in parts for k, v in _state(model, p).items()}
    model, result, _ = train(recipe, model, volume_store, progress=False)
    after = {k: v for p in parts for k, v in _state(model, p).items()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all(torch.isfinite(torch.tensor(h.loss)) for h in result.history)
    if step == "sequence":  # SAM 2's propagation path learns, object pointers included
        assert len(changed) > len(before) // 2
        assert any(k.startswith(("sam.obj_ptr", "sam.no_obj_ptr")) for k in changed)
    else:  # the image step never runs it
        assert changed == []


def test_sequence_forward_is_the_propagation_path(volume_store):
    """Slice c+1 of a clip is what `propagated` gives from the centre's memory, and every slice
    gets a gradient into memory attention."""
    from samed2_kit.engine.data import store_dataset
    from samed2_kit.medbank.dataset import collate_clips
    from samed2_kit.model.assemble import from_recipe
    from samed2_kit.types import Prompts
    from samed2_kit.volume.sequence import Pass, prompted, propagated, sequence_forward

    recipe = _recipe(volume_store)
    model = from_recipe(recipe).eval()
    assert model.spec.clip_len == 1  # the encoder's T, not the sequence length
    ds = store_dataset(recipe, volume_store, None, 0)
    batch = collate_clips([ds[0], ds[1]])
    out = model(batch, run=sequence_forward)
    assert out.low_res_logits.shape == (10, 1, 16, 16) and out.object_score_logits.shape == (10, 1)
    feats = model.encode(batch["image"], 1)
    with torch.no_grad():
        c = prompted(model, feats.select(torch.tensor([2])), Prompts(boxes=batch["box"][2:3]))
        mems, pointers = Pass.begin(model.sam, c, recipe.train.memory_frames, 5).context()
        assert pointers[1] == [1]  # the prompted slice, one slice back
        nxt = propagated(model, feats.select(torch.tensor([3])), list(mems.unbind(1)),
                         pointers=pointers)  # fmt: skip
    torch.testing.assert_close(out.low_res_logits[2:3], c.raw_logits)
    torch.testing.assert_close(out.low_res_logits[3:4], nxt.raw_logits)
    out.low_res_logits.sum().backward()
    # memory attention learns, and the object pointers' encodings (an untrained model calls every
    # object absent, so the pointer is `no_obj_ptr`, and obj_ptr_proj's gradient is gated off)
    for part in (model.sam.memory_attention, model.sam.obj_ptr_tpos_proj):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    assert model.sam.no_obj_ptr.grad.abs().sum() > 0


def test_sequence_errors_name_the_fix(volume_store):
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, "data.sequence_len=1")
    with pytest.raises(ValueError, match="runs of N >= 2 slices.*data.sequence_len"):
        train(recipe, from_recipe(recipe), volume_store, progress=False)
    with pytest.raises(ValueError, match="train.step='video': choose one of image, sequence"):
        load_recipe(None, ["train.step=video"])


def test_sequences_compose_with_temporal_adapters(volume_store):
    """The encoder sees clips of T=3 inside runs of N=3 slices (T must divide N)."""
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, "data.clip_len=3", "data.sequence_len=3",
                     "adapters.temporal={rank: 4}", "train.steps=2")  # fmt: skip
    model = from_recipe(recipe)
    seen = []
    hook = model.encoder_blocks[0].temporal_adapter.register_forward_pre_hook(
        lambda m, args: seen.append(args[1])
    )
    train(recipe, model, volume_store, progress=False)
    hook.remove()
    assert model.spec.clip_len == 3 and set(seen) == {3}
    bad = _recipe(
        volume_store, "data.clip_len=3", "data.sequence_len=5", "adapters.temporal={rank: 4}"
    )
    with pytest.raises(ValueError, match="multiple of 3"):
        train(bad, from_recipe(bad), volume_store, progress=False)


def test_slice_box_evaluates_whole_volumes_against_the_extruded_box(volume_store, hc18_store):
    import numpy as np

    from samed2_kit.config import EvalConfig
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine.volumes import extruded_box, key_slice
    from samed2_kit.model.assemble import from_recipe

    cfg = EvalConfig(prompt="slice-box", split="test")
    items = ev.eval_items(volume_store, cfg)
    assert [it.sample_id for it in items] == [f"{items[0].case_id}#tumour"]
    images, masks = items[0].load_volume()
    assert images.ndim == 3 and images.shape == masks.shape and masks.any()
    assert items[0].spacing[0] > 0 and len(items[0].spacing) == 3
    model = from_recipe(_recipe(volume_store)).eval()
    rows, preds = ev.evaluate(model, items, cfg, progress=False)
    assert preds[0].shape == masks.shape and 0 <= rows[0].dice <= 1
    # the baseline: the key slice's box on every slice with the object
    z = key_slice(masks)
    box = ev.gt_prompt(masks[z], "box")["box"]
    ext = extruded_box(masks, box)
    assert ext[z].sum() == (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    present = masks.reshape(len(masks), -1).any(1)
    assert not ext[~present].any() and ext[present].any(axis=(1, 2)).all()
    from samed2_kit.metrics import case_metrics

    assert rows[0].box_dice == case_metrics(ext, masks, items[0].spacing).dice
    with pytest.raises(ValueError, match="2D images only, so it has no volumes"):
        ev.eval_items(hc18_store, cfg)
    with pytest.raises(ValueError, match="evaluates volumes"):
        ev.evaluate(model, ev.eval_items(hc18_store, EvalConfig(split="test")), cfg)
    assert np.array_equal(preds[0], ev.evaluate(model, items, cfg, progress=False)[1][0])


def test_sequences_need_volumes_at_least_as_long(volume_store, hc18_store):
    from samed2_kit.engine.data import check_sequences, store_dataset

    with pytest.raises(ValueError, match="holds 2D images only: use train.step=image"):
        store_dataset(_recipe(hc18_store, "data.sequence_len=3"), hc18_store, None, 0)
    ds = store_dataset(_recipe(volume_store), volume_store, None, 0)
    with pytest.raises(ValueError, match="data.sequence_len=999 is longer than 1 volume"):
        check_sequences(ds, 999)


def test_volume_protocols_with_clicks_and_a_box_per_slice(volume_store):
    """slice-box+clicks: a 3D Dice after the box and after each click, the clicks re-propagated;
    box-per-slice: only the object's slices are predicted."""
    import numpy as np

    from samed2_kit.config import EvalConfig
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.model.assemble import from_recipe

    model = from_recipe(_recipe(volume_store)).eval()
    cfg = EvalConfig(prompt="slice-box+clicks", split="test", clicks=3)
    items = ev.eval_items(volume_store, cfg)
    rows, preds = ev.evaluate(model, items, cfg, progress=False)
    (row,) = rows
    assert len(row.click_dice) == 4 and row.dice_auc == ev.dice_auc(row.click_dice)
    _, gt = items[0].load_volume()
    assert row.click_dice[-1] == pytest.approx(ev.dice(preds[0], gt))
    plain, _ = ev.evaluate(model, items, EvalConfig(prompt="slice-box", split="test"),
                           progress=False)  # fmt: skip
    assert row.click_dice[0] == pytest.approx(plain[0].dice, abs=1e-6)
    assert row.box_dice == plain[0].box_dice  # the same baseline
    summary = ev.summarize(rows)["overall"]
    assert len(summary["click_dice"]) == 4
    per_slice, pred = ev.evaluate(model, items, EvalConfig(prompt="box-per-slice", split="test"),
                                  progress=False)  # fmt: skip
    absent = ~gt.any(axis=(1, 2))
    assert not pred[0][absent].any() and np.isfinite(per_slice[0].dice)


def test_clicks_in_3d_go_to_the_largest_error_at_its_innermost_voxel():
    import numpy as np

    from samed2_kit.engine.evaluate import largest_error

    gt = np.zeros((7, 9, 9), bool)
    gt[1:6, 2:7, 2:8] = True
    pred = gt.copy()
    pred[1:6, 2:7, 2:7] = False  # a missed 5x5x5 cube (false negatives)
    pred[0, 0, 0] = True  # one false positive
    assert largest_error(pred, gt) == ((3, 4, 4), True)  # the cube's centre
    assert largest_error(gt, gt) is None
    (z, y, x), positive = largest_error(gt | (np.arange(9) > 6)[None, None, :], gt)
    assert not positive and x >= 7


def test_sequence_training_resumes_exactly(volume_store, tmp_path):
    import shutil

    from samed2_kit.engine.state import checkpoint_dirs
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, "train.steps=4", "train.save_every=2", "train.tensorboard=false")
    _, full, _ = train(recipe, from_recipe(recipe), volume_store, tmp_path / "a", progress=False)
    shutil.rmtree(checkpoint_dirs(tmp_path / "a")[-1])  # back to step 2
    _, rest, _ = train(recipe, from_recipe(recipe), volume_store, tmp_path / "a", resume=True,
                       progress=False)  # fmt: skip
    assert [h.loss for h in rest.history] == [h.loss for h in full.history[2:]]


def test_a_sequence_longer_than_the_stored_neighbours_is_refused(volume_store):
    from samed2_kit.engine.data import store_dataset

    recipe = _recipe(volume_store, "data.sequence_len=7")  # the store keeps 2 on each side
    with pytest.raises(ValueError, match="data.sequence_len.*rebuild it with clip_radius >= 3"):
        store_dataset(recipe, volume_store, None, 0)


@pytest.mark.parametrize("protocol", ["slice-box", "box-per-slice", "box"])
def test_evaluation_of_a_temporal_model_encodes_its_clips(volume_store, monkeypatch, protocol):
    """In 3D and in 2D (slices through the Predictor): clips of the model's T, the stored
    neighbours around each evaluated slice."""
    import numpy as np

    from samed2_kit.config import EvalConfig
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, "data.clip_len=3", "adapters.temporal={rank: 4}")
    model = from_recipe(recipe).eval()
    calls = []
    encode = model.encode

    def spy(images, clip_len=1, meta=None):
        calls.append((images.shape[0], clip_len, images))
        return encode(images, clip_len, meta)

    monkeypatch.setattr(model, "encode", spy)
    cfg = EvalConfig(prompt=protocol, split="test", max_items=3)
    items = ev.eval_items(volume_store, cfg)
    ev.evaluate(model, items, cfg, progress=False)
    assert calls and all(t == 3 and n % 3 == 0 for n, t, _ in calls)
    if protocol == "box":  # the slice's stored neighbours, not the slice three times
        first = calls[0][2]
        assert not torch.equal(first[0], first[1]) or not torch.equal(first[1], first[2])
        clip = items[0].load_clip(3)
        assert np.array_equal(clip[1], items[0].load()[0])


def test_sequences_compose_with_the_confidence_memory(volume_store):
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(volume_store, "memory={threshold: 0.0, capacity: 8}", "train.steps=2")
    model, _, _ = train(recipe, from_recipe(recipe), volume_store, progress=False)
    assert 0 < len(model.memory.bank) <= 8 and not model.memory.writing


@pytest.mark.parametrize("pointers", [False, True])
def test_memory_attention_matches_sam2s_video_path(pointers):
    """Our conditioning of a slice on 3 earlier results and the prompted slice (10 slices back)
    equals sam2's `_prepare_memory_conditioned_features`: the same temporal encodings, and the
    same object-pointer tokens."""
    from samed2_kit.model import _sam2
    from samed2_kit.model.build import build_model

    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=64).eval()
    sam = model.sam
    with torch.no_grad():
        sam.maskmem_tpos_enc.normal_()  # learned in a checkpoint: make the slots tell apart
        feats = model.encode(torch.randn(1, 3, 64, 64))
        h = feats.image_embed.shape[-1]
        mems = torch.randn(4, 1, _sam2.memory_dim(sam), h, h)  # 3 recent (newest first), prompted
        ptrs = torch.randn(4, 1, sam.hidden_dim)  # the same order: 3 recent, prompted
        given = (ptrs[[3, 0, 1, 2]], [10, 1, 2, 3], 20) if pointers else None
        ours = _sam2.attend_memory(sam, feats, mems.transpose(0, 1), _sam2.frame_slots(sam, 3),
                                   given)  # fmt: skip
        pos = [_sam2.memory_pos(sam, mems[0])]

        def entry(k):
            return {"maskmem_features": mems[k], "maskmem_pos_enc": pos, "obj_ptr": ptrs[k]}

        outputs = {"cond_frame_outputs": {0: entry(3)},
                   "non_cond_frame_outputs": {9 - r: entry(r) for r in range(3)}}  # fmt: skip
        raw = _sam2.raw_embed(sam, feats).flatten(2).permute(2, 0, 1)
        sam.use_obj_ptrs_in_encoder = pointers
        theirs = sam._prepare_memory_conditioned_features(
            10, False, [raw], [feats.pos.flatten(2).permute(2, 0, 1)], [(h, h)], outputs, 20
        )
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
