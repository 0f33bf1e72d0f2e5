"""Simulated corrective clicks while training (`train.clicks`, `samed2_kit.engine.clicks`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samed2_kit.config import ClicksConfig


def _recipe(store, *extra):
    from samed2_kit.config import load_recipe

    return load_recipe(None, [f"data.store={store}", "model.image_size=64", "train.batch_size=2",
                              "train.steps=3", "train.warmup_steps=1", "train.lr=0.001",
                              "train.mixed_precision=no", "data.augment=false",
                              "train.tensorboard=false", *extra])  # fmt: skip


def test_clicks_come_from_the_error_region_with_its_label():
    from samed2_kit.engine.clicks import error_clicks

    gt = torch.zeros(3, 1, 16, 16)
    gt[:, :, 4:12, 4:12] = 1
    logits = torch.full((3, 1, 4, 4), -5.0)  # predicts nothing: every error is a false negative
    logits[1] = 5.0  # predicts everything: the errors are false positives
    logits[2] = torch.where(torch.nn.functional.avg_pool2d(gt[2:3], 4)[0] > 0.5, 5.0, -5.0)
    rngs = [np.random.default_rng(k) for k in range(3)]
    points, labels = error_clicks(logits, gt, rngs)
    assert points.shape == (3, 1, 2) and labels.shape == (3, 1)
    x, y = points[0, 0].long()
    assert labels[0, 0] == 1 and gt[0, 0, y, x] == 1  # a false negative: positive
    x, y = points[1, 0].long()
    assert labels[1, 0] == 0 and gt[1, 0, y, x] == 0  # a false positive: negative
    x, y = points[2, 0].long()  # no error left: anywhere, labelled by the ground truth
    assert labels[2, 0] == gt[2, 0, y, x]


def test_rounds_add_one_click_each_and_feed_back_the_previous_logits():
    from samed2_kit.engine.clicks import correct
    from samed2_kit.types import Prompts

    seen = []

    def decode(index, p):
        seen.append(p)
        k = len(index)
        return torch.randn(k, 1, 4, 4), torch.rand(k, 1), torch.randn(k, 1)

    gt = torch.zeros(4, 1, 16, 16)
    gt[:, :, 2:9, 3:10] = 1
    first = torch.randn(4, 1, 4, 4)
    boxes = torch.tensor([[3.0, 2, 9, 8]]).repeat(4, 1)
    rounds = correct(decode, first, Prompts(boxes=boxes), gt, [1, 2, 3, 4],
                     ClicksConfig(prob=1.0, rounds=3))  # fmt: skip
    assert len(rounds) == 3 and all(r.index.tolist() == [0, 1, 2, 3] for r in rounds)
    assert [p.points.shape[1] for p in seen] == [1, 2, 3]
    assert all(torch.equal(p.boxes, boxes) for p in seen)  # the first prompt stays
    assert torch.equal(seen[0].masks, first) and torch.equal(
        seen[1].masks, rounds[0].low_res_logits
    )
    assert torch.equal(seen[2].points[:, :2], seen[1].points)  # earlier clicks are kept
    assert correct(decode, first, Prompts(boxes=boxes), gt, [1, 2, 3, 4],
                   ClicksConfig(prob=0.0)) == []  # fmt: skip


def test_a_samples_clicks_depend_on_its_seed_only():
    """The choice and the clicks of one sample are the same alone and in another batch (so runs
    on 1 or N processes, and resumed runs, draw the same)."""
    from samed2_kit.engine.clicks import correct, selected_rows
    from samed2_kit.types import Prompts

    def clicks_of(seeds, first, gt):
        seen = []

        def decode(index, p):
            seen.append(p.points)
            return (
                torch.zeros(len(index), 1, 4, 4),
                torch.zeros(len(index), 1),
                torch.zeros(len(index), 1),
            )

        rounds = correct(decode, first, Prompts(), gt, seeds, ClicksConfig(prob=0.5, rounds=2))
        return rounds, seen

    seeds = list(range(100, 140))
    chosen = selected_rows(seeds, 0.5, 1)
    assert 8 < len(chosen) < 32  # about half
    assert selected_rows(seeds, 1.0, 2) == list(range(80)) and selected_rows(seeds, 0.0, 1) == []
    gt = (torch.rand(40, 1, 16, 16) > 0.5).float()
    first = torch.randn(40, 1, 4, 4)
    rounds, seen = clicks_of(seeds, first, gt)
    k = chosen[3]
    alone_rounds, alone = clicks_of([seeds[k]], first[k : k + 1], gt[k : k + 1])
    assert alone_rounds[0].index.tolist() == [0]
    assert torch.equal(alone[-1][0], seen[-1][3])


@pytest.mark.parametrize("bad", [{"prob": 1.5}, {"prob": -0.1}, {"rounds": 0}, {"rounds": 21},
                                 {"rounds": True}])  # fmt: skip
def test_bad_click_settings_name_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"train.clicks.{key}"):
        ClicksConfig(**bad)


def test_training_with_clicks_trains_on_every_round_and_resumes_exactly(hc18_store, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    import shutil

    from samed2_kit.engine import steps
    from samed2_kit.engine.state import checkpoint_dirs
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = _recipe(hc18_store, "train.clicks.prob=1.0", "train.clicks.rounds=2",
                     "train.steps=4", "train.save_every=2")  # fmt: skip
    rounds = []
    image_step = steps.image_step

    def spy(model, batch, recipe, loss_fn):
        res = image_step(model, batch, recipe, loss_fn)
        rounds.append(len(res.out.rounds))
        return res

    monkeypatch.setitem(steps.STEPS, "image", spy)
    _, full, _ = train(recipe, from_recipe(recipe), hc18_store, tmp_path / "a", progress=False)
    assert rounds == [2] * 4 and all(np.isfinite(h.loss) for h in full.history)
    shutil.rmtree(checkpoint_dirs(tmp_path / "a")[-1])  # back to step 2
    _, rest, _ = train(recipe, from_recipe(recipe), hc18_store, tmp_path / "a", resume=True,
                       progress=False)  # fmt: skip
    assert [h.loss for h in rest.history] == [h.loss for h in full.history[2:]]
    plain = _recipe(hc18_store, "train.steps=4")
    _, without, _ = train(plain, from_recipe(plain), hc18_store, progress=False)
    assert without.history[0].loss != full.history[0].loss  # the rounds' loss counts


def test_sequence_training_corrects_the_prompted_slice_before_propagating(volume_store):
    """With clicks, the centre slice gets its rounds, and propagation starts from the corrected
    result: the propagated slices differ from a run without clicks."""
    from samed2_kit.engine.data import store_dataset
    from samed2_kit.medbank.dataset import collate_clips
    from samed2_kit.model.assemble import from_recipe
    from samed2_kit.volume.sequence import sequence_forward

    recipe = _recipe(volume_store, "train.step=sequence", "data.sequence_len=5")
    torch.manual_seed(0)
    model = from_recipe(recipe).eval()
    ds = store_dataset(recipe, volume_store, None, 0)
    batch = collate_clips([ds[0], ds[1]])
    with torch.no_grad():
        plain = model(batch, run=sequence_forward)
        cfg = ClicksConfig(prob=1.0, rounds=2)
        clicked = model(batch, run=lambda m, b: sequence_forward(m, b, clicks=cfg))
    assert plain.rounds == [] and len(clicked.rounds) == 2
    assert clicked.rounds[0].index.tolist() == [2, 7]  # the centre slice of each run of 5
    centre = torch.tensor([2, 7])
    assert torch.equal(plain.low_res_logits[centre], clicked.low_res_logits[centre])
    others = torch.tensor([0, 1, 3, 4, 5, 6, 8, 9])
    assert not torch.equal(plain.low_res_logits[others], clicked.low_res_logits[others])
