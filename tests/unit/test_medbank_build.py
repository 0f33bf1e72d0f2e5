import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samed2_kit.medbank.build import build
from samed2_kit.medbank.spec import load_spec
from samed2_kit.medbank.store import info_table, open_store, verify

REPO = Path(__file__).resolve().parents[2]


def _nifti(path, array_zyx, spacing=(2.0, 1.0, 1.0), dtype=np.float32, flip_x=False):
    """Write (Z, Y, X) as NIfTI (x, y, z) with the given spacing (z, y, x) mm."""
    aff = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    data = np.asarray(array_zyx).transpose(2, 1, 0)
    if flip_x:  # same grid stored mirrored: LAS instead of RAS
        data = data[::-1]
        aff[0, 0] *= -1
        aff[0, 3] = (array_zyx.shape[2] - 1) * spacing[2]
    nib.save(nib.Nifti1Image(data.astype(dtype), aff), str(path))


def _volume_case(folder: Path, key: str, z=6, size=32, seed=0):
    """A CT-like volume with label 1 (a square on slices 1-3) and label 2 (slice 4)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 200, (z, size, size)).astype(np.float32)
    lab = np.zeros((z, size, size), np.uint8)
    lab[1:4, 8:20, 8:20] = 1
    lab[4, 2:6, 2:6] = 2
    _nifti(folder / f"{key}_img.nii.gz", img)
    _nifti(folder / f"{key}_lab.nii.gz", lab, dtype=np.uint8)
    return img, lab


def _spec(folder: Path, sources: str, extra: str = "") -> Path:
    path = folder / "spec.yaml"
    path.write_text(f"split: {{train: 0.5, test: 0.5}}\n{extra}sources:\n{sources}")
    return path


def _build(spec_path: Path, out: Path, **kw):
    spec, sha = load_spec(spec_path)
    return build(spec, out, sha, progress=False, **kw)


VOLS = """  - {name: vols, layout: volumes, root: data, image: "{id}_img.nii.gz", mask: "{id}_lab.nii.gz",
     labels: {1: liver, 2: lesion}, modality: ct, task: liver, licence: CC0}
"""


def test_bundled_samples_build_verify_and_info(tmp_path):
    spec, sha = load_spec(REPO / "recipes" / "medbank_samples.yaml")
    report = build(spec, tmp_path / "store", sha, progress=False)
    assert report.samples == 75 and report.images == 49  # 45 HC18 + 30 CT masks on 4 slices
    assert [p for p, _ in report.skipped] == [
        str(REPO / "samed2_kit/sample_data/sam_med2d_demo/images/amos_0507_31.png")
    ]
    manifest, images, samples = open_store(tmp_path / "store")
    assert manifest["spec_sha256"] == sha and manifest["tool"].startswith("samed2-kit")
    assert sum(c["samples"] for c in manifest["counts"]) == 75
    splits = {}
    for case, split in zip(samples["case_id"], samples["split"], strict=True):
        splits.setdefault(case, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())  # never a case in two splits
    row = samples[0]
    assert (
        row["mask_area"] > 0
        and len(row["neighbors"]) == 5
        and set(row["neighbors"]) == {row["image_row"]}
    )
    assert max(images[row["image_row"]]["image"].size) <= 512  # max_size with rescaled spacing
    # 800x540 px stored as 512x346: the pixel size grows by 800/512 (isotropic up to rounding)
    assert row["spacing"][2] == pytest.approx(0.069135804 * 800 / 512, rel=1e-5)  # 000_HC.png
    assert row["spacing"][1] == pytest.approx(row["spacing"][2], rel=5e-3)
    table = info_table(tmp_path / "store")
    assert "| us | fetal_head |" in table and "| ct | abdomen_ct_organs |" in table
    assert verify(tmp_path / "store", progress=False).ok


def test_verify_detects_tampering(tmp_path):
    (tmp_path / "data").mkdir()
    _volume_case(tmp_path / "data", "a")
    _volume_case(tmp_path / "data", "b", seed=1)
    _build(_spec(tmp_path, VOLS), tmp_path / "store")
    assert verify(tmp_path / "store", progress=False).ok
    mpath = tmp_path / "store" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["content_sha256"]["samples"] = "0" * 64
    manifest["counts"][0]["samples"] += 1
    mpath.write_text(json.dumps(manifest))
    problems = verify(tmp_path / "store", progress=False).problems
    assert any("samples: content hash differs" in p for p in problems)
    assert any("counts differ" in p for p in problems)


def test_volumes_are_sliced_with_neighbours(tmp_path):
    (tmp_path / "data").mkdir()
    _, lab = _volume_case(tmp_path / "data", "a")
    _volume_case(tmp_path / "data", "b", seed=1)
    report = _build(_spec(tmp_path, VOLS, "clip_radius: 1\n"), tmp_path / "store")
    assert report.samples == 2 * (3 + 1) and not report.skipped
    _, images, samples = open_store(tmp_path / "store")
    rows = [r for r in samples if r["case_id"] == "vols/a"]
    liver = {r["slice_index"]: r for r in rows if r["label"] == "liver"}
    assert sorted(liver) == [1, 2, 3] and {r["label"] for r in rows} == {"liver", "lesion"}
    r2 = liver[2]
    assert [images[i]["slice_index"] for i in r2["neighbors"]] == [1, 2, 3]
    assert [samples[i]["slice_index"] if i >= 0 else -1 for i in r2["neighbor_samples"]] == [
        1,
        2,
        3,
    ]
    r3 = liver[3]  # slice 4 holds no liver: -1
    assert r3["neighbor_samples"][2] == -1
    mask = np.asarray(samples[samples["case_id"].index("vols/a")]["mask"])
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
    assert r2["mask_area"] == int(lab[2].sum()) == 144
    assert r2["spacing"] == [2.0, 1.0, 1.0]


def test_axis_and_empty_slice_rule(tmp_path):
    (tmp_path / "data").mkdir()
    img = np.zeros((6, 16, 16), np.float32)
    lab = np.zeros((6, 16, 16), np.uint8)
    lab[0, 4:8, 4:8] = 1
    lab[5, 4:8, 4:8] = 1  # slices 1-4 inside the label's range are empty
    _nifti(tmp_path / "data" / "a_img.nii.gz", img)
    _nifti(tmp_path / "data" / "a_lab.nii.gz", lab, dtype=np.uint8)
    src = VOLS.replace("licence: CC0}", "licence: CC0, empty_keep_fraction: 1.0}")
    report = _build(_spec(tmp_path, src, "split: {train: 1.0}\n"), tmp_path / "store")
    areas = open_store(tmp_path / "store")[2]["mask_area"]
    assert report.samples == 6 and sorted(areas) == [0, 0, 0, 0, 16, 16]
    src = VOLS.replace("licence: CC0}", "licence: CC0, axis: 1}")
    report = _build(_spec(tmp_path, src, "split: {train: 1.0}\n"), tmp_path / "store2")
    _, images, samples = open_store(tmp_path / "store2")
    assert report.samples == 4  # rows 4-7 along y
    assert images[0]["image"].size == (16, 6) and samples[0]["spacing"] == [1.0, 2.0, 1.0]


def test_label_map_stored_mirrored_is_aligned(tmp_path):
    (tmp_path / "data").mkdir()
    _, lab = _volume_case(tmp_path / "data", "a")
    _nifti(tmp_path / "data" / "a_lab.nii.gz", lab, dtype=np.uint8, flip_x=True)
    _build(_spec(tmp_path, VOLS, "split: {train: 1.0}\n"), tmp_path / "store")
    samples = open_store(tmp_path / "store")[2]
    row = next(r for r in samples if r["label"] == "lesion")
    mask = np.asarray(row["mask"]) > 0
    assert mask[2:6, 2:6].all() and mask.sum() == 16  # not mirrored to columns 26-30


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _volume_case(d, "good")
    img, lab = _volume_case(d, "nan", seed=2)
    img[0, 0, 0] = np.nan
    _nifti(d / "nan_img.nii.gz", img)
    _volume_case(d, "frac", seed=3)
    _nifti(d / "frac_lab.nii.gz", lab.astype(np.float32) * 0.5)
    _volume_case(d, "geom", seed=4)
    _nifti(d / "geom_lab.nii.gz", lab[:, :20], dtype=np.uint8)
    (d / "junk_img.nii.gz").write_text("not a nifti")
    _nifti(d / "junk_lab.nii.gz", lab, dtype=np.uint8)
    report = _build(_spec(tmp_path, VOLS), tmp_path / "store")
    reasons = {Path(p).name: why for p, why in report.skipped}
    assert "NaN" in reasons["nan_img.nii.gz"]
    assert "non-integer" in reasons["frac_img.nii.gz"]
    assert "geometry mismatch" in reasons["geom_img.nii.gz"]
    assert "junk_img.nii.gz" in reasons["junk_img.nii.gz"]
    assert open_store(tmp_path / "store")[2].unique("case_id") == ["vols/good"]


def test_duplicate_case_ids_and_unknown_modality(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _volume_case(d, "a")
    items = """  - {name: v, layout: volumes, root: data, modality: ct, task: t, licence: CC0, items: [
       {id: same, image: a_img.nii.gz, mask: a_lab.nii.gz},
       {id: same, image: a_img.nii.gz, mask: a_lab.nii.gz}]}
"""
    report = _build(_spec(tmp_path, items, "split: {train: 1.0}\n"), tmp_path / "store")
    assert len(report.skipped) == 1 and "duplicate case id 'same'" in report.skipped[0][1]
    with pytest.raises(ValueError, match="unknown modality 'xr'"):
        load_spec(_spec(tmp_path, VOLS.replace("modality: ct", "modality: xr")))


def test_nothing_usable_and_interrupted_builds_leave_nothing(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    (d / "x_img.nii.gz").write_text("junk")
    (d / "x_lab.nii.gz").write_text("junk")
    with pytest.raises(ValueError, match="nothing usable remains"):
        _build(_spec(tmp_path, VOLS), tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "spec.yaml"]
    _volume_case(d, "a")
    _volume_case(d, "b", seed=1)
    import samed2_kit.medbank.cases as cases

    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = cases.slice_case
    monkeypatch.setattr(cases, "slice_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(_spec(tmp_path, VOLS), tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "spec.yaml"]


def test_nnunet_and_msd_layouts(tmp_path):
    for layout in ("nnunet", "msd"):
        root = tmp_path / layout
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        for k in range(3):
            img, lab = _volume_case(root, f"tmp{k}", seed=k)
            name = f"case_{k:03d}"
            image_name = f"{name}_0000.nii.gz" if layout == "nnunet" else f"{name}.nii.gz"
            (root / f"tmp{k}_img.nii.gz").rename(root / "imagesTr" / image_name)
            (root / f"tmp{k}_lab.nii.gz").rename(root / "labelsTr" / f"{name}.nii.gz")
        if layout == "nnunet":
            meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "lesion": 2},
                    "numTraining": 3, "file_ending": ".nii.gz"}  # fmt: skip
        else:
            meta = {"labels": {"0": "background", "1": "liver", "2": "lesion"}, "modality": {"0": "CT"},
                    "training": [{"image": f"./imagesTr/case_{k:03d}.nii.gz",
                                  "label": f"./labelsTr/case_{k:03d}.nii.gz"} for k in range(3)]}  # fmt: skip
        (root / "dataset.json").write_text(json.dumps(meta))
    src = """  - {name: nn, layout: nnunet, root: nnunet, modality: ct, task: liver, licence: CC0}
  - {name: msd, layout: msd, root: msd, modality: ct, task: liver, licence: CC0}
"""
    report = _build(_spec(tmp_path, src, "split: {train: 0.67, test: 0.33}\n"), tmp_path / "store")
    assert report.samples == 2 * 3 * 4 and not report.skipped
    samples = open_store(tmp_path / "store")[2]
    assert set(samples["label"]) == {"liver", "lesion"}
    assert set(samples["case_id"]) == {f"{s}/case_{k:03d}" for s in ("nn", "msd") for k in range(3)}


@pytest.mark.slow  # every real set; the bundled samples build in the default tier
def test_every_shared_data_set_builds_and_verifies(tmp_path, shared_data):
    spec, sha = load_spec(REPO / "tests" / "data" / "shared_data_spec.yaml")
    report = build(spec, tmp_path / "store", sha, progress=False)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    built = {s["name"]: s["cases"] for s in manifest["sources"]}
    assert all(n > 0 for n in built.values()), (built, report.skipped)
    assert verify(tmp_path / "store", progress=False).ok


def test_labels_with_one_name_are_one_object():
    """`labels: {1: hippocampus, 2: hippocampus}`: the two label ids become one object."""
    import numpy as np

    from samed2_kit.medbank.cases import merge_same_names
    from samed2_kit.medbank.io.volume import Segment

    a, b = np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool)
    a[0, 0, 0], b[1, 3, 3] = True, True
    merged = merge_same_names([Segment(1, "hc", a), Segment(2, "hc", b), Segment(3, "x", b)])
    assert [(s.label_id, s.name) for s in merged] == [(1, "hc"), (3, "x")]
    assert merged[0].mask.sum() == 2 and merged[0].mask[0, 0, 0] and merged[0].mask[1, 3, 3]
