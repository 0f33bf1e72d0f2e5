"""Tests for samed2_kit.medbank.pairs: pair matching, case splits and the torch Dataset."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from samed2_kit.medbank.pair_dataset import PairDataset, collate
from samed2_kit.medbank.pairs import PairSource, find_pairs, sample_sources, split_by_case
from samed2_kit.prompts import PromptConfig

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.fixture(scope="module")
def hc18():
    return find_pairs(sample_sources()["hc18"])


@pytest.fixture(scope="module")
def smd():
    return find_pairs(sample_sources()["sam_med2d_demo"])


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def _pair(tmp_path, name="a", hw=(30, 40), mask_hw=None, empty=False):
    img = (np.arange(hw[0] * hw[1]) % 251).astype(np.uint8).reshape(hw)
    mask = np.zeros(mask_hw or hw, np.uint8)
    if not empty:
        mask[5:15, 4:20] = 255  # not symmetric: flips show
    _png(tmp_path / "img" / f"{name}.png", img)
    _png(tmp_path / "lab" / f"{name}_m.png", mask)


def _src(tmp_path, **kw):
    return PairSource(root=str(tmp_path), image="img/{id}.png", mask="lab/{id}_m.png", **kw)


def test_hc18_pairs_cases_and_spacing(hc18):
    assert len(hc18.records) == 45 and hc18.skipped == []
    by_case = {}
    for r in hc18.records:
        by_case.setdefault(r.case_id, []).append(Path(r.image_path).name)
    assert sorted(by_case["010"]) == ["010_2HC.png", "010_HC.png"]
    assert len(by_case["014"]) == 3 and len(by_case) == 35
    first = hc18.records[0]
    assert Path(first.mask_path).name == "000_HC_Annotation.png"
    assert first.spacing == (0.069135804, 0.069135804) and first.spacing_known
    assert (first.modality, first.task, first.licence) == ("us", "fetal_head", "CC-BY-4.0")
    assert all(r.spacing_known for r in hc18.records)


def test_sam_med2d_labels_and_skipped(smd):
    assert len(smd.records) == 30
    assert len({r.image_path for r in smd.records}) == 4
    liver = [r for r in smd.records if r.sample_id == "amos_0004_75#liver_000"]
    assert len(liver) == 1 and Path(liver[0].image_path).name == "amos_0004_75.png"
    assert liver[0].label == "liver_000" and liver[0].case_id == "amos_0004"
    labels = {r.label for r in smd.records}
    assert {"rib_left_9_000", "vertebrae_T9_000", "hip_left_001"} <= labels
    assert [Path(p).name for p, _ in smd.skipped] == ["amos_0507_31.png"]
    assert "no mask" in smd.skipped[0][1]
    assert not smd.records[0].spacing_known and smd.records[0].spacing == (1.0, 1.0)
    assert smd.records[0].intensity == "2d" and smd.records[0].modality == "ct"


def test_split_by_case(hc18, smd):
    splits = split_by_case(hc18.records, seed=0)
    assert sum(len(v) for v in splits.values()) == 45
    cases = {k: {r.case_id for r in v} for k, v in splits.items()}
    assert not cases["train"] & cases["test"]
    assert len(cases["train"]) == 28 and len(cases["test"]) == 7  # 35 cases, 80/20
    again = split_by_case(hc18.records, seed=0)
    assert [r.sample_id for r in again["test"]] == [r.sample_id for r in splits["test"]]
    other = split_by_case(hc18.records, seed=1)
    assert {r.case_id for r in other["test"]} != cases["test"]
    three = split_by_case(smd.records, {"train": 0.9, "val": 0.05, "test": 0.05}, seed=0)
    seen = [{r.case_id for r in v} for v in three.values()]
    assert all(len(s) == 1 or k == 0 for k, s in enumerate(seen)) and len(seen[0]) == 2
    assert len(set().union(*seen)) == 4 and sum(map(len, seen)) == 4
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_case(hc18.records, {"train": 0.5, "test": 0.2})


def test_longest_id_wins_and_masks_are_not_images(tmp_path):
    for name in ("a_1", "a_1_2", "x", "y", "w"):
        _png(tmp_path / f"{name}.png", np.zeros((4, 4), np.uint8))
    for name in ("a_1_2_liver", "a_1_kidney", "x_mask", "x_mask_1", "y_mask", "z_mask"):
        _png(tmp_path / f"{name}.png", np.full((4, 4), 255, np.uint8))
    src = PairSource(root=str(tmp_path), image="{id}.png", mask="{id}_{label}.png")
    ids = {r.sample_id: Path(r.mask_path).name for r in find_pairs(src).records}
    assert ids["a_1_2#liver"] == "a_1_2_liver.png" and ids["a_1#kidney"] == "a_1_kidney.png"
    busi_like = PairSource(root=str(tmp_path), image="{id}.png", mask="{id}_mask{label}.png")
    scan = find_pairs(busi_like)
    assert [r.sample_id for r in scan.records] == ["x", "x#_1", "y"]
    skipped = {Path(p).name: why for p, why in scan.skipped}
    assert "w.png" in skipped and "z_mask.png" in skipped and "x_mask.png" not in skipped
    assert "image missing" in skipped["z_mask.png"]


def test_label_before_id_and_orphan_masks(tmp_path):
    for name in ("p1", "p2"):
        _png(tmp_path / "images" / f"{name}.png", np.zeros((4, 4), np.uint8))
    for label, name in (("liver", "p1"), ("liver", "p2"), ("spleen", "p1"), ("spleen", "p9")):
        _png(tmp_path / "masks" / label / f"{name}.png", np.full((4, 4), 255, np.uint8))
    scan = find_pairs(PairSource(str(tmp_path), "images/{id}.png", "masks/{label}/{id}.png"))
    assert [r.sample_id for r in scan.records] == ["p1#liver", "p1#spleen", "p2#liver"]
    assert [(Path(p).name, why) for p, why in scan.skipped] == [
        ("p9.png", "no image for this mask")
    ]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_pairs(PairSource(str(tmp_path / "nowhere"), "{id}.png", "{id}_m.png"))
    with pytest.raises(ValueError, match="PairSource.mask"):
        PairSource(str(tmp_path), "{id}.png", "masks/{name}.png")
    with pytest.raises(ValueError, match="PairSource.image"):
        PairSource(str(tmp_path), "{id}_{label}.png", "{id}_m.png")
    with pytest.raises(ValueError, match="valid names"):
        PairSource(str(tmp_path), "{id}.png", "{id}_m.png", intensity="pet")
    _pair(tmp_path, "abc")
    with pytest.raises(ValueError, match=r"group 1 in id 'abc'"):
        find_pairs(_src(tmp_path, case=r"^(\d+)"))
    (tmp_path / "sp.csv").write_text("image,size\nabc.png,0.5\n")
    with pytest.raises(ValueError, match="sp.csv"):
        find_pairs(_src(tmp_path, spacing_csv="sp.csv"))
    (tmp_path / "sp.csv").write_text("filename,pixel spacing (mm)\nabc.png,0.5\n")
    rec = find_pairs(_src(tmp_path, spacing_csv="sp.csv")).records[0]
    assert rec.spacing == (0.5, 0.5) and rec.spacing_known


def test_dataset_items_and_determinism(hc18):
    records = hc18.records[:3]
    cfg = PromptConfig(mode="box+point", box_jitter=0.1, n_pos=2, n_neg=1)
    ds = PairDataset(records, image_size=128, prompt=cfg, seed=5)
    item = ds[1]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 128, 128) and set(item["mask"].unique().tolist()) == {0, 1}
    assert item["box"].dtype == torch.float32 and item["has_box"]
    assert item["points"].shape == (3, 2) and item["point_labels"].tolist() == [1, 1, 0]
    assert item["orig_hw"] == (540, 800) and item["case_id"] == "001"
    assert item["spacing"] == records[1].spacing and item["task"] == "fetal_head"
    x0, y0, x1, y1 = item["box"].tolist()
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    m = item["mask"][0]  # the S-space box surrounds the S-space mask (within jitter)
    rows, cols = torch.nonzero(m, as_tuple=True)
    assert abs(x0 - cols.min().item()) < 5 and abs(y1 - rows.max().item()) < 5
    same = PairDataset(records, image_size=128, prompt=cfg, seed=5)[1]
    torch.testing.assert_close(same["box"], item["box"])
    torch.testing.assert_close(same["points"], item["points"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["box"], item["box"])
    batch = collate([ds[0], PairDataset(records, 128, seed=5)[2]])
    assert batch["image"].shape == (2, 3, 128, 128) and batch["points"].shape == (2, 3, 2)
    assert batch["point_labels"][1].tolist() == [-1, -1, -1] and batch["has_box"].all()
    assert batch["orig_hw"].tolist() == [[540, 800]] * 2 and batch["case_id"] == ["000", "002"]


def test_dataset_on_ct_demo_keeps_thin_structures(smd):
    ribs = [r for r in smd.records if r.label.startswith("rib_")]
    ds = PairDataset(ribs, image_size=64)
    assert len(ds) == 2 and all(ds[i]["mask"].sum() > 0 for i in range(2))


def test_size_mismatch_names_both_files(tmp_path):
    _pair(tmp_path, "bad", hw=(30, 40), mask_hw=(40, 30))
    ds = PairDataset(find_pairs(_src(tmp_path)).records, image_size=32)
    with pytest.raises(ValueError, match=r"bad_m\.png is 40x30 \(HxW\), image .*bad\.png is 30x40"):
        ds[0]


def test_empty_masks_and_unreadable_images(tmp_path):
    _pair(tmp_path, "full")
    _pair(tmp_path, "none", empty=True)
    records = find_pairs(_src(tmp_path)).records
    kept = PairDataset(records, image_size=32)
    assert len(kept) == 1 and [r.sample_id for r in kept.dropped] == ["none"]
    both = PairDataset(records, image_size=32, drop_empty=False)
    item = both[1]
    assert item["sample_id"] == "none" and item["mask"].sum() == 0 and item["has_box"]
    np.testing.assert_allclose(item["box"], [0, 0, 39 * 32 / 40, 29 * 32 / 30], rtol=1e-6)
    (tmp_path / "img" / "full.png").write_text("not an image")
    with pytest.raises(ValueError, match="full.png"):
        kept[0]


def test_augment_is_seeded_and_consistent(tmp_path):
    _pair(tmp_path, "a")
    records = find_pairs(_src(tmp_path)).records
    plain = PairDataset(records, image_size=40, prompt=PromptConfig(box_jitter=0))[0]
    aug = PairDataset(records, image_size=40, prompt=PromptConfig(box_jitter=0), augment=True)
    masks = []
    for epoch in range(6):
        aug.set_epoch(epoch)
        a, b = aug[0], aug[0]
        torch.testing.assert_close(a["image"], b["image"])  # same seed and epoch: same sample
        torch.testing.assert_close(a["mask"], b["mask"])
        m = a["mask"][0] > 0
        ys, xs = torch.nonzero(m, as_tuple=True)
        # the prompt box follows the augmented mask (tight box, no jitter; S-space of 40 px)
        x0, y0, x1, y1 = a["box"].tolist()
        assert abs(x0 - xs.min().item()) <= 2 and abs(y0 - ys.min().item()) <= 2
        assert abs(x1 - xs.max().item()) <= 2 and abs(y1 - ys.max().item()) <= 2
        # small affine: the object keeps roughly its area
        assert 0.6 < m.sum() / (plain["mask"] > 0).sum() < 1.5
        masks.append(m)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # epochs differ


def test_busi_real_layout(tmp_path):
    busi = SHARED / "busi"
    if not busi.is_dir():
        pytest.skip("shared data folder ../shared/data/busi not available")
    scan = find_pairs(PairSource(str(busi), "images/{id}.png", "masks/{id}_mask{label}.png"))
    assert len(scan.records) == 51 and scan.skipped == []
    assert [r.sample_id for r in scan.records if r.label] == ["benign_4#_1"]
    # the same files in one flat folder: masks must not be taken as images
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((busi / "images").iterdir()) + list((busi / "masks").iterdir()):
        shutil.copy(p, flat / p.name)
    scan = find_pairs(PairSource(str(flat), "{id}.png", "{id}_mask{label}.png"))
    assert len(scan.records) == 51 and scan.skipped == []
    assert not any("_mask" in Path(r.image_path).name for r in scan.records)
    ds = PairDataset(scan.records, image_size=32)
    assert len(ds.dropped) == 10 and all(r.sample_id.startswith("normal_") for r in ds.dropped)
