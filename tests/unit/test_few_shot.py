"""Prompt sources in the model: zero-gate identity with every source on, few-shot prediction
through the Predictor, no state change outside training, save/load, episodes, the training loop."""

import json

import numpy as np
import pytest
import torch

from samed2_kit.config import load_recipe
from samed2_kit.model import build_model
from samed2_kit.model.assemble import add_sources
from samed2_kit.model.assemble import load as load_model
from samed2_kit.model.assemble import save as save_model
from samed2_kit.model.predictor import Predictor
from samed2_kit.sources import HardPrototypesConfig, SimilarityPriorConfig

H, W = 150, 200


def _disk(cy, cx, r, shape=(H, W)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _image(mask, seed):
    rng = np.random.default_rng(seed)
    img = rng.normal(60, 10, mask.shape)
    img[mask] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def _with_sources(model, prior=True, hard=True):
    cfg = {}
    if prior:
        cfg["similarity_prior"] = SimilarityPriorConfig(slots=4, dim=8, warmup_updates=0)
    if hard:
        cfg["hard_prototypes"] = HardPrototypesConfig(max_supports=2)
    add_sources(model, cfg, ["disk"])
    return model


def _fill_prior(model):
    """One training update of the prior from a synthetic batch, so that its pool is not empty."""
    prior = model.prompt_sources["similarity_prior"]
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    gt = torch.zeros(2, 1, 256, 256)
    gt[:, :, 80:160, 80:160] = 1
    prior.train()
    with torch.no_grad():
        items = [prior.rows_from(model.encode(x), gt, {"task": ["disk", "disk"]})]
        prior.commit(items, loss=1.0)
    prior.eval()
    assert int(prior.filled.sum()) > 0


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_every_source_on_predicts_exactly_plain_sam2_until_trained(tiny_model):
    sup_mask, query_mask = _disk(70, 90, 30), _disk(80, 110, 35)
    box = [70, 40, 150, 120]
    plain = Predictor(tiny_model)
    plain.set_image(_image(query_mask, 1))
    want, want_scores, _ = plain.predict(box=box, multimask_output=True)

    model = _with_sources(tiny_model)
    _fill_prior(model)
    pred = Predictor(model)
    pred.set_support(_image(sup_mask, 0), sup_mask)
    pred.set_image(_image(query_mask, 1))
    got, got_scores, _ = pred.predict(box=box, multimask_output=True)
    assert np.array_equal(got, want) and np.array_equal(got_scores, want_scores)
    with torch.no_grad():  # open the gates: the sources now change the prediction
        for g in model.source_gates.values():
            g.fill_(1.0)
    _, opened, _ = pred.predict(box=box, multimask_output=True)
    assert not np.allclose(opened, want_scores)


def test_few_shot_prediction_is_deterministic_and_needs_no_prompt(tiny_model):
    model = _with_sources(tiny_model, prior=False)
    sup_mask, query_mask = _disk(70, 90, 30), _disk(80, 110, 35)
    pred = Predictor(model)
    with pytest.raises(ValueError, match="at least one prompt"):
        pred.set_image(_image(query_mask, 1))
        pred.predict()
    pred.set_support(_image(sup_mask, 0), sup_mask)
    pred.set_image(_image(query_mask, 1))
    a, sa, la = pred.predict(multimask_output=False)
    torch.manual_seed(123)  # nothing random: another global seed gives the same mask
    pred.set_support([_image(sup_mask, 0)], [sup_mask])
    b, sb, lb = pred.predict(multimask_output=False)
    assert a.shape == (1, H, W)
    assert np.array_equal(a, b) and np.array_equal(sa, sb) and np.array_equal(la, lb)
    xy, lab = pred.suggested_clicks  # the clicks the source prompted with, in image pixels
    assert len(xy) == len(lab) >= 1 and lab[0] == 1
    assert (xy >= 0).all() and (xy[:, 0] <= W).all() and (xy[:, 1] <= H).all()
    both, _, _ = pred.predict(box=[70, 40, 150, 120], multimask_output=False)  # with a box too
    assert both.shape == (1, H, W) and pred.suggested_clicks is None


def test_bad_supports_are_clear_errors(tiny_model):
    pred = Predictor(tiny_model)
    m = _disk(70, 90, 30)
    with pytest.raises(ValueError, match="a prompt source that reads supports"):
        pred.set_support(_image(m, 0), m)
    pred = Predictor(_with_sources(tiny_model, prior=False))
    with pytest.raises(ValueError, match="differ in size"):
        pred.set_support(_image(m, 0), m[:, :100])
    with pytest.raises(ValueError, match="empty"):
        pred.set_support(_image(m, 0), np.zeros_like(m))
    with pytest.raises(ValueError, match="all foreground"):
        pred.set_support(_image(m, 0), np.ones_like(m))
    with pytest.raises(ValueError, match="max_supports=2"):
        pred.set_support([_image(m, k) for k in range(3)], [m] * 3)
    with pytest.raises(ValueError, match="3 images but 2 masks"):
        pred.set_support([_image(m, k) for k in range(3)], [m] * 2)


def test_prediction_and_evaluation_change_no_state(tiny_model):
    from samed2_kit.config import EvalConfig
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine.items import EvalItem

    model = _with_sources(tiny_model)
    _fill_prior(model)
    before = _state(model)
    m = _disk(70, 90, 30)
    pred = Predictor(model)
    pred.set_support(_image(m, 0), m)
    pred.set_image(_image(_disk(80, 110, 35), 1))
    pred.predict()
    items = [
        EvalItem(f"s{k}", f"c{k}", "disk", "disk", (1.0, 1.0),
                 lambda k=k: (_image(_disk(75, 100, 30 + k), k), _disk(75, 100, 30 + k)))
        for k in range(2)
    ]  # fmt: skip
    rows, _ = ev.evaluate(model, items, EvalConfig(prompt="support"), False, {"disk": items[:1]})
    assert len(rows) == 2 and all(0 <= r.dice <= 1 for r in rows)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="only while training"):
        model.prompt_sources["similarity_prior"].commit([], 1.0)
    with pytest.raises(ValueError, match="no support examples for task 'disk'"):
        ev.evaluate(model, items, EvalConfig(prompt="support"), False, {})
    with pytest.raises(ValueError, match="needs a model with a prompt source that reads supports"):
        ev.evaluate(build_model("test-tiny", image_size=256), items, EvalConfig(prompt="support"))


def test_save_load_round_trip_keeps_sources_and_their_state(tiny_model, tmp_path):
    model = _with_sources(tiny_model)
    _fill_prior(model)
    with torch.no_grad():
        for g in model.source_gates.values():
            g.fill_(0.5)
    save_model(model, tmp_path)
    saved = json.loads((tmp_path / "model.json").read_text())
    assert set(saved["sources"]) == {"similarity_prior", "hard_prototypes"}
    loaded = load_model(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m, q = _disk(70, 90, 30), _disk(80, 110, 35)
    out = []
    for mdl in (model, loaded):
        pred = Predictor(mdl)
        pred.set_support(_image(m, 0), m)
        pred.set_image(_image(q, 1))
        out.append(pred.predict(multimask_output=False)[2])
    assert np.array_equal(out[0], out[1])

    saved["spec"]["image_size"] = 128  # the sources' tensors no longer fit the model
    (tmp_path / "model.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="a bank only works with|image_size=128|image size"):
        load_model(tmp_path)


class _FakeBase:
    clip_len, split, store_dir, epoch = 1, "train", "store", 0

    def __init__(self, tasks, cases, areas):
        self.cols = {"task": tasks, "case_id": cases, "mask_area": areas}

    def column(self, name):
        return self.cols[name]

    def __len__(self):
        return len(self.cols["task"])


def test_episodes_need_another_case_of_the_task():
    from samed2_kit.engine.episodes import Episodes

    with pytest.raises(ValueError, match="task 'liver' has one case"):
        Episodes(_FakeBase(["liver", "liver", "x", "x"], ["a", "a", "b", "c"], [5, 5, 5, 5]))
    with pytest.raises(ValueError, match="another case"):  # the other case's mask is empty
        Episodes(_FakeBase(["liver", "liver"], ["a", "b"], [5, 0]))
    base = _FakeBase(["liver"] * 2, ["a", "b"], [5, 5])
    base.clip_len = 3
    with pytest.raises(ValueError, match="data.clip_len=1"):
        Episodes(base)


def test_episodes_pair_queries_with_other_cases(hc18_store):
    from samed2_kit.engine.data import store_dataset
    from samed2_kit.engine.episodes import Episodes

    recipe = load_recipe(None, ["model.image_size=64", "data.prompt.mode=none"])
    ep = Episodes(store_dataset(recipe, hc18_store, None, 0), seed=0)
    picks = {}
    for epoch in (0, 1):
        ep.set_epoch(epoch)
        for i in range(len(ep)):
            item = ep[i]
            sup_case = item["support_id"].split("#")[0]
            assert sup_case != item["case_id"] and item["task"] == "fetal_head"
            assert item["support_image"].shape == (3, 64, 64)
            assert item["support_mask"].shape == (1, 64, 64) and item["support_mask"].sum() > 0
            picks[(epoch, i)] = item["support_id"]
    ep.set_epoch(0)
    assert ep[0]["support_id"] == picks[(0, 0)]  # the same episode again
    assert any(picks[(0, i)] != picks[(1, i)] for i in range(len(ep)))  # new episodes per epoch


def test_training_updates_the_prior_and_trains_the_prototype_heads(hc18_store):
    from samed2_kit.engine.train import train
    from samed2_kit.model.assemble import from_recipe

    recipe = load_recipe(None, [
        "model.image_size=64", "train.batch_size=2", "train.steps=3", "train.warmup_steps=1",
        "train.mixed_precision=no", "data.episodes=true", "data.prompt.mode=none",
        "sources={similarity_prior: {slots: 4, dim: 8, warmup_updates: 2}, hard_prototypes: {}}",
    ])  # fmt: skip
    model = from_recipe(recipe, tasks=["fetal_head"])
    head = model.prompt_sources["hard_prototypes"]
    before = {k: v.clone() for k, v in head.state_dict().items()}
    model, result, _ = train(recipe, model, hc18_store, progress=False)
    prior = model.prompt_sources["similarity_prior"]
    assert int(prior.updates) == 3 and int(prior.filled.sum()) > 0  # k-means ran at update 2
    assert "source/hard_prototypes" in result.history[-1].parts
    after = head.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(float(g.detach()) != 0.0 for g in model.source_gates.values())  # the gates opened


def test_predictor_mines_a_support_set_once(tiny_model, monkeypatch):
    model = _with_sources(tiny_model, prior=False)
    src = model.prompt_sources["hard_prototypes"]
    calls = []
    mine = src._mine
    monkeypatch.setattr(src, "_mine", lambda *a: calls.append(1) or mine(*a))
    m, q = _disk(70, 90, 30), _disk(80, 110, 35)
    pred = Predictor(model)
    pred.set_support(_image(m, 0), m)
    pred.set_image(_image(q, 1))
    first = pred.predict()[2]
    again = pred.predict(box=[70, 40, 150, 120])[2]
    assert len(calls) == 1 and not np.array_equal(first, again)
    pred.set_support(_image(m, 2), m)  # a new support set is mined anew
    pred.predict()
    assert len(calls) == 2
