"""Field of view (the store's images/ column `fov`): training's loss and clicks and evaluation's
metrics ignore the pixels outside it; a store without the column behaves as before."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samed2_kit.config import EvalConfig, LossConfig
from samed2_kit.losses import SegLoss, real_iou

ALL_TERMS = LossConfig(dice_ce=1.0, focal=1.0, iou=1.0, object_score=1.0, boundary=1.0, source=1.0)
HW = (36, 44)  # synthetic images: not square, so H/W mix-ups show


def _png(arr: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def add_fov(store, make) -> None:
    """Give `store`'s images/ table a `fov` column (datasets Image(), PNG 0/255) from
    make(image row, (H, W)) -> (H, W) bool or None, as the writing side stores it."""
    import datasets
    from datasets import Image, load_from_disk

    folder = Path(store) / "images"
    images = load_from_disk(str(folder))
    if "fov" in images.column_names:  # a build that already writes the column (None: no FOV)
        images = images.remove_columns("fov")
    cells = []
    for r in range(len(images)):
        fov = make(r, np.asarray(images[r]["image"]).shape[:2])
        cells.append(None if fov is None else {"bytes": _png(fov.astype(np.uint8) * 255),
                                               "path": None})  # fmt: skip
    datasets.disable_progress_bars()
    new = Path(store) / "images.fov"
    images.add_column("fov", cells, feature=Image()).save_to_disk(str(new))
    shutil.rmtree(folder)
    new.rename(folder)


def left_half(_row, hw) -> np.ndarray:
    fov = np.zeros(hw, bool)
    fov[:, : hw[1] // 2] = True
    return fov


# -- the loss ----------------------------------------------------------------------------------


def _inputs(seed: int = 0, b: int = 3, m: int = 3, size: int = 16):
    """Logits at gt resolution (no resize mixes inside and outside pixels), heads, gt, FOV."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, m, size, size, generator=g) * 3
    iou, obj = torch.rand(b, m, generator=g), torch.randn(b, 1, generator=g)
    gt = torch.zeros(b, 1, size, size)
    gt[:, :, 3:12, 2:13] = 1
    gt[b - 1] = 0  # one sample without an object
    valid = torch.zeros(b, 1, size, size)
    valid[..., : size // 2 + 1] = 1
    src = {"proto": torch.randn(b, 1, size, size, generator=g)}
    return logits, iou, obj, gt, valid, src


def test_loss_without_valid_is_the_loss_as_before():
    logits, iou, obj, gt, valid, src = _inputs()
    loss = SegLoss(ALL_TERMS)
    plain, none = loss(logits, iou, obj, gt, src), loss(logits, iou, obj, gt, src, valid=None)
    assert torch.equal(plain.total, none.total) and plain.parts == none.parts
    assert torch.equal(plain.best_mask, none.best_mask)
    # a FOV covering every pixel: the same numbers (soft Dice follows MONAI's formula)
    ones = loss(logits, iou, obj, gt, src, valid=torch.ones_like(valid))
    assert torch.allclose(ones.total, plain.total, rtol=1e-5, atol=1e-6)
    assert ones.parts == pytest.approx(plain.parts, rel=1e-5, abs=1e-6)
    assert torch.equal(real_iou(logits, gt, torch.ones_like(valid)), real_iou(logits, gt))


def test_logits_and_gt_outside_the_fov_change_nothing():
    logits, iou, obj, gt, valid, src = _inputs()
    loss = SegLoss(ALL_TERMS)
    base = loss(logits, iou, obj, gt, src, valid=valid)
    outside = valid == 0
    g = torch.Generator().manual_seed(1)
    other = torch.where(outside.expand_as(logits), torch.randn(logits.shape, generator=g) * 9,
                        logits)  # fmt: skip
    other_src = {"proto": torch.where(outside, 50.0, src["proto"])}
    other_gt = torch.where(outside, 1 - gt, gt)  # the gt outside the FOV does not count either
    moved = loss(other, iou, obj, other_gt, other_src, valid=valid)
    assert torch.equal(moved.best_mask, base.best_mask)
    assert torch.allclose(moved.total, base.total, rtol=1e-6, atol=1e-7)
    assert moved.parts == pytest.approx(base.parts, rel=1e-6, abs=1e-7)
    x = logits.clone().requires_grad_(True)
    loss(x, iou, obj, gt, src, valid=valid).total.backward()
    assert x.grad[outside.expand_as(x)].abs().max() == 0 and x.grad.abs().max() > 0
    without = loss(other, iou, obj, gt, src).total  # without the FOV the change shows
    assert not torch.allclose(without, loss(logits, iou, obj, gt, src).total)


def test_an_object_only_outside_the_fov_is_absent():
    _, iou, obj, _, valid, _ = _inputs(b=1, m=1)
    gt = torch.zeros(1, 1, 16, 16)
    gt[..., 12:15] = 1  # right of the FOV
    logits = torch.full((1, 1, 16, 16), -20.0)  # predicts nothing
    loss = SegLoss(LossConfig(dice_ce=1.0, iou=1.0, object_score=0.0))
    out = loss(logits, iou, obj, gt, valid=valid)
    assert out.parts["dice_ce"] == 0.0
    assert real_iou(logits, gt, valid).item() == 1.0 and real_iou(logits, gt).item() == 0.0


def test_valid_of_another_shape_is_refused():
    logits, iou, obj, gt, valid, _ = _inputs()
    with pytest.raises(ValueError, match="valid .* must have gt's shape"):
        SegLoss()(logits, iou, obj, gt, valid=valid[:, :, :8])


# -- training: clicks and the step ------------------------------------------------------------


def test_clicks_stay_inside_the_fov():
    from samed2_kit.engine.clicks import error_clicks

    gt = torch.zeros(4, 1, 16, 16)
    gt[:, :, 4:12, 4:12] = 1
    logits = torch.full((4, 1, 4, 4), 5.0)  # predicts everything: errors on both sides
    valid = torch.zeros(4, 1, 16, 16)
    valid[..., :6] = 1
    for seed in range(20):
        rngs = [np.random.default_rng([seed, k]) for k in range(4)]
        points, labels = error_clicks(logits, gt, rngs, valid)
        assert (points[:, 0, 0] < 6).all()
        assert all(labels[i, 0] == gt[i, 0, int(p[1]), int(p[0])] for i, p in
                   enumerate(points[:, 0]))  # fmt: skip
    # without a FOV: the clicks as before (the same draws)
    rngs = [np.random.default_rng(k) for k in range(4)]
    a = error_clicks(logits, gt, rngs)
    rngs = [np.random.default_rng(k) for k in range(4)]
    b = error_clicks(logits, gt, rngs, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_image_step_passes_the_batch_fov_to_the_loss():
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.steps import image_step

    recipe = load_recipe(None, ["model.image_size=64", "train.mixed_precision=no"])
    seen = []

    def loss_fn(*args, **kw):
        seen.append(kw.get("valid"))
        return SimpleNamespace(total=torch.zeros(()), parts={}, best_mask=torch.zeros(2))

    out = SimpleNamespace(
        low_res_logits=torch.zeros(2, 1, 16, 16),
        iou=torch.zeros(2, 1),
        object_score_logits=torch.zeros(2, 1),
        source_logits={},
        rounds=[],
    )
    batch = {"image": torch.zeros(2, 3, 64, 64), "mask": torch.zeros(2, 1, 64, 64),
             "box": torch.zeros(2, 4), "points": torch.zeros(2, 0, 2),
             "point_labels": torch.zeros(2, 0, dtype=torch.int64), "clip_len": 1,
             "case_id": ["a", "b"], "task": ["t", "t"], "modality": ["us", "us"]}  # fmt: skip
    image_step(lambda *a, **k: out, batch, recipe, loss_fn)
    valid = torch.ones(2, 1, 64, 64)
    image_step(lambda *a, **k: out, {**batch, "valid": valid}, recipe, loss_fn)
    assert seen[0] is None and seen[1] is valid


# -- the store dataset ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two copies of the synthetic store (2 volumes of 5 slices, one RGB 2D image): one
    without a `fov` column, one whose FOV is the left half of every image but the 2D one (None)."""
    from samed2_kit.medbank._synthetic import write_synthetic_store

    plain = write_synthetic_store(tmp_path_factory.mktemp("plain"), hw=HW, clip_radius=2)
    with_fov = tmp_path_factory.mktemp("fov") / "store"
    shutil.copytree(plain, with_fov)
    n_vol = 10  # image rows of the two volumes; row 10 is the 2D image
    add_fov(with_fov, lambda r, hw: left_half(r, hw) if r < n_vol else None)
    return plain, with_fov


def test_store_with_a_fov_yields_it_aligned_with_the_mask(synthetic):
    from samed2_kit.medbank.dataset import StoreDataset, collate_clips
    from samed2_kit.medbank.preprocess import resize_mask

    _, store = synthetic
    ds = StoreDataset(store, clip_len=3, image_size=32)
    expected = resize_mask(left_half(0, HW), 32)
    vol = [i for i in range(len(ds)) if ds[i]["case_id"] == "synth/vol0"]
    image = next(i for i in range(len(ds)) if ds[i]["case_id"] == "synth/img0")
    for i in vol:
        item = ds[i]
        assert item["valid"].shape == (3, 1, 32, 32) and item["valid"].dtype == torch.float32
        assert all(torch.equal(v, expected) for v in item["valid"])
    assert torch.equal(ds[image]["valid"], torch.ones(3, 1, 32, 32))  # its fov is None
    batch = collate_clips([ds[vol[0]], ds[image]])
    assert batch["valid"].shape == (6, 1, 32, 32)
    assert torch.equal(batch["valid"][:3], ds[vol[0]]["valid"])
    assert torch.equal(batch["valid"][3:], torch.ones(3, 1, 32, 32))
    assert "valid" not in collate_clips([ds[image]])  # nothing outside a FOV: as before


def test_augmentation_moves_the_fov_with_the_mask(tmp_path):
    """FOV = the mask of label "a" on each slice: after the seeded flip/affine and the resize,
    `valid` must still equal the mask, slice by slice."""
    from samed2_kit.medbank._synthetic import write_synthetic_store
    from samed2_kit.medbank.dataset import StoreDataset, decode_png, open_store_raw

    store = write_synthetic_store(tmp_path / "store", hw=HW, clip_radius=1)
    _, samples = open_store_raw(store)
    a = {}
    for s in samples.select_columns(["mask", "image_row", "label"]):
        if s["label"] == "a":
            a[s["image_row"]] = decode_png(s["mask"], "test") > 0
    add_fov(store, lambda r, hw: a[r])
    ds = StoreDataset(store, clip_len=3, image_size=24, augment=True, tasks=["organs"])
    plain = StoreDataset(store, clip_len=3, image_size=24, augment=True, tasks=["organs"])
    plain._fovs = None  # the same store read as if it had no FOV
    checked = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        plain.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            if item["label"] != "a":
                continue
            assert torch.equal(item["valid"], item["mask"]), (epoch, i)
            ref = plain[i]  # the FOV changes neither the image, the mask nor the prompt
            for key in ("image", "mask", "box", "points"):
                assert torch.equal(item[key], ref[key]), key
            checked += 1
    assert checked >= 15


def test_store_without_fov_behaves_as_before(synthetic, tmp_path):
    """No `fov` column, or one with None in every cell: no FOV is read, `valid` is all ones,
    batches carry none, and the items are those of the store without the column."""
    from samed2_kit.medbank.dataset import StoreDataset, collate_clips

    plain, _ = synthetic
    nones = tmp_path / "store"
    shutil.copytree(plain, nones)
    add_fov(nones, lambda r, hw: None)
    ds, ds_none = (StoreDataset(s, clip_len=3, image_size=32, augment=True) for s in (plain, nones))
    assert ds._fovs is None and ds_none._fovs is None
    items = [ds[i] for i in range(4)]
    assert all(torch.equal(it["valid"], torch.ones(3, 1, 32, 32)) for it in items)
    assert "valid" not in collate_clips(items)
    for i, it in enumerate(items):
        other = ds_none[i]
        assert all(torch.equal(it[k], other[k]) for k in ("image", "mask", "valid", "box"))


# -- evaluation -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hc18_fov(tmp_path_factory):
    """The bundled HC18 images at 64 px through the real build, then a `fov` column: the left
    half of every image. Returns (store without the column, store with it)."""
    from tests.conftest import build_store

    root = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data" / "hc18"
    plain = build_store(
        tmp_path_factory, "hc18-fov",
        "split: {train: 0.6, val: 0.2, test: 0.2}\nmax_size: 64\nsources:\n"
        f"  - {{name: hc18, layout: pairs, root: '{root}', image: 'images/00{{id}}HC.png',\n"
        "     mask: 'masks/00{id}HC_Annotation.png', spacing_csv: pixel_size.csv,\n"
        "     modality: us, task: fetal_head, licence: CC-BY-4.0}\n",
    )  # fmt: skip
    with_fov = Path(plain).parent / "store-fov"
    shutil.copytree(plain, with_fov)
    add_fov(with_fov, left_half)
    return plain, str(with_fov)


class WrongOutside:
    """A predictor that returns the item's ground truth plus the whole right half (outside the
    FOV): right inside the FOV, wrong only outside it."""

    def __init__(self, gt: np.ndarray) -> None:
        self.gt = gt

    def set_image(self, image, **kw) -> None:
        pass

    def predict(self, **kw):
        pred = self.gt.copy()
        pred[:, pred.shape[1] // 2 :] = True
        return pred[None], np.ones(1), np.zeros((1, 16, 16), np.float32)


@pytest.mark.parametrize("protocol", ["box", "box+clicks"])
def test_a_prediction_wrong_only_outside_the_fov_scores_dice_1(hc18_fov, protocol):
    from samed2_kit.engine.evaluate import evaluate_item
    from samed2_kit.engine.items import items_from_store

    plain, store = hc18_fov
    cfg = EvalConfig(prompt=protocol, clicks=2)
    checked = 0
    for item in items_from_store(store, "train"):
        image, gt = item.load()
        valid = item.load_valid()
        assert valid.shape == gt.shape and np.array_equal(valid, left_half(0, gt.shape))
        out = evaluate_item(WrongOutside(gt), item, cfg)
        if out is None:  # the head lies wholly outside the FOV
            continue
        row, pred = out
        assert row.dice == 1.0 and row.nsd == 1.0 and row.hd95 == 0.0
        assert not pred[~valid].any()
        if protocol == "box+clicks":
            assert row.click_dice == [1.0] * 3
        checked += 1
    assert checked >= 3
    # the same items without the column: every pixel counts, and the prediction is wrong
    items = items_from_store(plain, "train")
    assert all(it.load_valid is None or it.load_valid() is None for it in items)
    row, _ = evaluate_item(WrongOutside(items[0].load()[1]), items[0], cfg)
    assert row.dice < 1.0


def test_case_metrics_zero_both_masks_outside_the_fov():
    from samed2_kit.metrics import case_metrics

    gt = np.zeros((20, 20), bool)
    gt[5:12, 2:8] = True
    gt[0:3, 15:19] = True  # outside the FOV: does not count
    pred = gt.copy()
    pred[10:18, 12:20] = True  # wrong, outside the FOV
    pred[0:3, 15:19] = False
    valid = np.zeros((20, 20), bool)
    valid[:, :10] = True
    m = case_metrics(pred, gt, (1.0, 1.0), 1.0, valid=valid)
    assert (m.dice, m.nsd, m.hd95) == (1.0, 1.0, 0.0)
    assert case_metrics(pred, gt, (1.0, 1.0), 1.0).dice < 1.0
    with pytest.raises(ValueError, match="valid .* must have the masks' shape"):
        case_metrics(pred, gt, valid=valid[:10])


def test_volume_evaluation_zeroes_outside_the_fov(monkeypatch):
    from samed2_kit.engine import volumes

    gt = np.zeros((4, 16, 16), bool)
    gt[1:3, 4:10, 2:7] = True
    valid = np.zeros_like(gt)
    valid[..., :8] = True
    seen = {}

    def protocol(model, images, gt_in, box, z, cfg, spacing, valid=None):
        seen["valid"] = valid
        pred = gt_in.copy()
        pred[..., 10:] = True  # wrong only outside the FOV
        return pred, []

    monkeypatch.setitem(volumes.VOLUME_PROTOCOLS, "fake", protocol)
    item = volumes.VolumeItem("c#l", "c", "t", "l", "mr", (2.0, 1.0, 1.0), 0,
                              lambda: (np.zeros((4, 16, 16), np.uint8), gt),
                              load_valid=lambda: valid)  # fmt: skip
    cfg = SimpleNamespace(prompt="fake", nsd_tolerance=lambda modality: 1.0)
    row, pred = volumes.evaluate_volume(None, item, cfg)
    assert seen["valid"] is valid and row.dice == 1.0 and row.hd95 == 0.0
    assert not pred[~valid].any()
    item.load_valid = None  # no FOV: every voxel counts
    row, _ = volumes.evaluate_volume(None, item, cfg)
    assert row.dice < 1.0
