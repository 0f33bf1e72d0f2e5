"""Tests for samed2_kit.medbank.dataset: clips from a medbank store, prompts, collate_clips."""

import numpy as np
import pytest
import torch

from samed2_kit.medbank import _synthetic
from samed2_kit.medbank._synthetic import RGB, SyntheticCase, slice_value, write_synthetic_store
from samed2_kit.medbank.dataset import StoreDataset, collate_clips
from samed2_kit.medbank.pair_dataset import collate
from samed2_kit.medbank.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_mask
from samed2_kit.prompts import PromptConfig

HW = (36, 44)  # (H, W) of the synthetic images: not square, so H/W mix-ups show
POINTS = PromptConfig(mode="box+point", n_pos=2, n_neg=1)


def write_store(path, hw=HW, clip_radius=2):
    """A tiny store per the schema: 2 volumes of 5 slices (train ct, test mr) with label "a" on
    every slice and "b" on slices 1-2, and one RGB 2D case (train us); neighbours z-2..z+2."""
    return write_synthetic_store(path, hw=hw, clip_radius=clip_radius)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("store"))


def _pixels(image: torch.Tensor) -> np.ndarray:
    """(..., 3, S, S) ImageNet-normalised -> (..., S, S, 3) grey values 0-255 (float)."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((image.movedim(-3, -1) * std + mean) * 255).numpy()


def _slice_of(clip: torch.Tensor) -> list[int]:
    """The slice index encoded in each slice's bottom-right pixel (outside the bar)."""
    values = [round(float(v)) for v in _pixels(clip)[:, -1, -1, 0]]
    return [[slice_value(z) for z in range(5)].index(v) for v in values]


def _row(ds, case, label, z):
    for i in range(len(ds)):
        s = ds._samples[int(ds.rows[i])]
        if (s["case_id"], s["label"], s["slice_index"]) == (case, label, z):
            return i
    raise KeyError((case, label, z))


@pytest.mark.parametrize("clip_len", [1, 3, 5])
def test_shapes_and_dtypes(store, clip_len):
    ds = StoreDataset(store, clip_len=clip_len, image_size=32, prompt=POINTS, augment=True)
    item = ds[0]
    assert item["image"].shape == (clip_len, 3, 32, 32) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (clip_len, 1, 32, 32) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["box"].shape == (4,) and item["points"].shape == (3, 2)
    assert item["point_labels"].tolist() == [1, 1, 0] and item["has_box"]
    assert item["orig_hw"] == HW and len(item["spacing"]) == 3
    assert item["sample_id"] == f"{item['case_id']}#{item['label']}@{item['slice_index']}"
    batch = collate_clips([ds[0], ds[1]])
    assert batch["image"].shape == (2 * clip_len, 3, 32, 32) and batch["clip_len"] == clip_len
    assert batch["mask"].shape == (2 * clip_len, 1, 32, 32)
    assert batch["points"].shape == (2 * clip_len, 3, 2) and batch["box"].shape == (2 * clip_len, 4)
    assert batch["spacing"].shape == (2, 3) and batch["orig_hw"].tolist() == [list(HW)] * 2
    assert len(batch["case_id"]) == 2 and batch["slice_index"].shape == (2,)


def test_clip_len_1_matches_pair_collate(store):
    ds = StoreDataset(store, image_size=32, prompt=POINTS)
    items = [ds[i] for i in range(3)]
    ours = collate_clips(items)
    pairs = collate([{**it, "image": it["image"][0], "mask": it["mask"][0]} for it in items])
    assert set(ours) - set(pairs) == {"clip_len", "slice_index", "seed"}
    for key, value in pairs.items():
        if torch.is_tensor(value):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("clip_len", [2, 3, 5])
def test_clip_holds_adjacent_slices_in_order(store, clip_len):
    ds = StoreDataset(store, clip_len=clip_len, image_size=32)
    for z in range(5):
        item = ds[_row(ds, "synth/vol0", "a", z)]
        start = z - clip_len // 2
        expected = [min(max(k, 0), 4) for k in range(start, start + clip_len)]
        assert _slice_of(item["image"]) == expected, z  # z=0 of 5: [0, 0, 0, 1, 2]
        assert item["slice_index"] == z


def test_2d_rgb_case_is_its_own_neighbour(store):
    ds = StoreDataset(store, clip_len=5, image_size=32, tasks=["fetal_head"])
    item = ds[0]
    corner = _pixels(item["image"])[:, -1, -1]
    assert np.allclose(corner, np.array(RGB)[None], atol=0.6)  # RGB order, all 5 slices
    assert all(torch.equal(item["mask"][t], item["mask"][2]) for t in range(5))
    assert item["modality"] == "us" and item["spacing"] == (1.0, 0.5, 0.5)


def test_neighbour_masks_come_from_neighbor_samples(store):
    ds = StoreDataset(store, clip_len=5, image_size=32)

    def expected(label, z):
        m = _synthetic._mask(label, z, 5, HW)
        return torch.zeros(1, 32, 32) if m is None else resize_mask(m > 0, 32)

    for label, z in (("b", 1), ("b", 2), ("a", 0), ("a", 3)):
        item = ds[_row(ds, "synth/vol0", label, z)]
        for t, zz in enumerate(min(max(z + k, 0), 4) for k in range(-2, 3)):
            assert torch.equal(item["mask"][t], expected(label, zz)), (label, z, t)
    b1 = ds[_row(ds, "synth/vol0", "b", 1)]["mask"]
    assert [bool(m.any()) for m in b1] == [False, False, True, True, False]  # -1 -> empty


def test_deterministic_per_seed_and_epoch(store):
    def items(epoch, seed=0):
        ds = StoreDataset(store, clip_len=3, image_size=32, prompt=POINTS, augment=True, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i] for i in range(len(ds))]

    a, b, c, d = items(0), items(0), items(1), items(0, seed=1)
    for x, y in zip(a, b, strict=True):
        for key in ("image", "mask", "box", "points", "point_labels"):
            assert torch.equal(x[key], y[key]), key
    for other in (c, d):
        assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(a, other, strict=True))
        assert any(not torch.equal(x["box"], y["box"]) for x, y in zip(a, other, strict=True))


def test_augmentation_is_identical_across_the_clip(tmp_path):
    """Slice t = value v_t + a bar, so after one affine and intensity draw x_t - x_c is
    scale * (v_t - v_c) * warp(ones): proportional to v_t - v_c wherever nothing clipped. A flip
    of one slice and not another would leave the bar in the difference."""
    square = write_store(tmp_path, hw=(40, 40))  # image_size = 40: no resize after the warp
    ds = StoreDataset(square, clip_len=5, image_size=40, augment=True)
    i, flips = _row(ds, "synth/vol0", "a", 2), 0
    v = np.array([slice_value(z) for z in range(5)], float)
    for epoch in range(8):
        ds.set_epoch(epoch)
        x = _pixels(ds[i]["image"])[..., 0]  # (5, 40, 40)
        ok = (x > 0.5).all(0) & (x < 254.5).all(0)
        ratio = [(x[t] - x[2])[ok] / (v[t] - v[2]) for t in (0, 1, 3, 4)]
        for r in ratio[1:]:
            np.testing.assert_allclose(r, ratio[0], atol=2e-3)
        flips += x[2][:, 20:].mean() > x[2][:, :20].mean()  # the bar went right
    assert 0 < flips < 8


def test_split_and_filters(store):
    train, test = StoreDataset(store), StoreDataset(store, split="test")
    assert len(train) == 8 and len(test) == 7
    assert {train[i]["case_id"] for i in range(8)} == {"synth/vol0", "synth/img0"}
    assert {test[i]["modality"] for i in range(7)} == {"mr"}
    assert len(StoreDataset(store, modalities=["ct"])) == 7
    assert len(StoreDataset(store, tasks=["fetal_head"])) == 1
    assert len(StoreDataset(store, tasks=["organs", "fetal_head"], modalities=["us"])) == 1


def test_errors_name_the_store_and_the_fix(store, tmp_path):
    with pytest.raises(ValueError, match="not a medbank store.*medbank build"):
        StoreDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"no samples of split 'val'.*\['test', 'train'\]"):
        StoreDataset(store, split="val")
    with pytest.raises(ValueError, match="rebuild it with clip_radius >= 3"):
        StoreDataset(store, clip_len=6)
    with pytest.raises(ValueError, match="clip_len <= 5"):
        StoreDataset(store, clip_len=7)
    with pytest.raises(ValueError, match="at least 1"):
        StoreDataset(store, clip_len=0)
    with pytest.raises(ValueError, match=r"no task \['liver'\] in split 'train'"):
        StoreDataset(store, tasks=["liver"])
    with pytest.raises(ValueError, match="loosen"):
        StoreDataset(store, tasks=["fetal_head"], modalities=["ct"])  # each exists
    narrow = write_store(tmp_path / "r1", clip_radius=1)
    with pytest.raises(ValueError, match="clip_radius 1.*clip_radius >= 2"):
        StoreDataset(narrow, clip_len=5)


def test_collate_clips_layout(store):
    ds = StoreDataset(store, clip_len=3, image_size=32, prompt=POINTS)
    items = [ds[0], ds[3], ds[7]]
    items[1] = {**items[1], "points": items[1]["points"][:1], "point_labels": torch.ones(1).long()}
    out = collate_clips(items)
    for b, item in enumerate(items):
        for t in range(3):
            assert torch.equal(out["image"][b * 3 + t], item["image"][t])
            assert torch.equal(out["mask"][b * 3 + t], item["mask"][t])
            assert torch.equal(out["box"][b * 3 + t], item["box"])
    assert out["point_labels"][3:6].tolist() == [[1, -1, -1]] * 3  # padded with -1
    assert out["sample_id"] == [it["sample_id"] for it in items]
    with pytest.raises(ValueError, match="one clip_len"):
        collate_clips([items[0], StoreDataset(store, image_size=32)[0]])


def test_dataloader_workers_give_the_same_batches(store):
    ds = StoreDataset(store, clip_len=3, image_size=32, prompt=POINTS, augment=True, seed=3)
    ds.set_epoch(2)

    def batches(workers):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=3, collate_fn=collate_clips, num_workers=workers
        )
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        for key, value in a.items():
            assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key]


def test_more_cases_and_clip_radius(tmp_path):
    cases = (SyntheticCase("v", 3, "train"),)
    ds = StoreDataset(
        write_synthetic_store(tmp_path, cases, hw=(16, 16), clip_radius=3), clip_len=7
    )
    item = ds[_row(ds, "synth/v", "a", 1)]
    assert _slice_of(item["image"]) == [0, 0, 0, 1, 2, 2, 2]
