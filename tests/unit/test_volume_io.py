"""Tests for the volume readers: NIfTI, NRRD, MedSAM npz, read_volume dispatch, real sample data."""

import sys
import types
from pathlib import Path

import cv2
import nibabel as nib
import nrrd
import numpy as np
import pytest

from samed2_kit.medbank.io import read_volume
from samed2_kit.medbank.io.labels import load_label_names
from samed2_kit.medbank.io.nifti import read_nifti
from samed2_kit.medbank.io.npz import read_npz
from samed2_kit.medbank.io.nrrd import read_nrrd
from samed2_kit.medbank.io.volume import same_geometry, segments_from_labelmap

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
RNG = np.random.default_rng(0)  # arrays written in file order (x, y, z); .T gives (z, y, x)
LAS = np.array([[-0.5, 0, 0, 12], [0, 0.8, 0, -7], [0, 0, 2.5, 3], [0, 0, 0, 1]])
SD = np.array([[0.3, 0.4, 0.0], [-0.72, 0.54, 0.0], [0.0, 0.0, 2.0]])  # oblique, spacing .5 .9 2
VOLUMES = ["v.nii", "v.nii.gz", "v.nrrd", "v.nhdr", "v.npz"]
IMAGES = ["v.png", "v.tif", "v.tiff", "v.bmp", "v.jpg", "v.jpeg"]
TOTALSEG = {  # image: (labels, name table, orientation, shape, max id, label count)
    "example_ct_sm": ("example_seg", "total", "RAS", (30, 101, 122), 117, 41),
    "example_mr_sm": ("example_seg_mr", "total_mr", "LPS", (20, 91, 117), 49, 23),
}
P = "prostate_phantom_subvolume"
PYRADIOMICS = [  # image, label, label values, spacing (z, y, x) mm
    *[(f"brain{i}_image", f"brain{i}_label", {0, 1}, (6.5, 0.78125, 0.78125)) for i in (1, 2)],
    ("breast1_image", "breast1_label", {0, 1}, (2.1, 0.664062, 0.664062)),
    (P, P + "-label", {0, 1, 7, 8, 9}, (3, 0.5, 0.5)),
]


def _xyz(shape=(4, 5, 6), dtype=np.float32):
    return RNG.integers(-100, 100, size=shape).astype(dtype)


def _nifti(path, data, affine=LAS):
    nib.save(nib.Nifti1Image(data, affine), str(path))  # sform code 2 (aligned)
    return path


def _nrrd(path, data, space="left-posterior-superior", **kw):
    hdr = {"space": space, "space directions": SD, "space origin": np.array([10.0, 20, 30])}
    nrrd.write(str(path), data, hdr, **kw)
    return path


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_nifti_geometry_scaling_and_labels(tmp_path):
    data = _xyz()
    vol = read_nifti(_nifti(tmp_path / "a.nii.gz", data))
    assert vol.array.shape == (6, 5, 4) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, data.T)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.5)) and vol.meta["orientation"] == "LAS"
    np.testing.assert_allclose(vol.affine, LAS)
    np.testing.assert_allclose(vol.affine @ [1, 2, 3, 1], [12 - 0.5, -7 + 1.6, 3 + 7.5, 1])
    hu = data * 3.5 - 1000.0  # stored as int16 + scl_slope/scl_inter
    nib.save(nib.Nifti1Image(hu, np.eye(4), dtype=np.int16), tmp_path / "s.nii")
    np.testing.assert_allclose(read_nifti(tmp_path / "s.nii").array, hu.T, atol=0.1)
    labels = _xyz((3, 4, 5), np.uint8) % 5
    lab = read_nifti(_nifti(tmp_path / "l.nii.gz", labels), labels=True)
    assert lab.array.dtype == np.uint8 and lab.meta["is_label_map"]
    np.testing.assert_array_equal(lab.array, labels.T)
    floats = read_nifti(_nifti(tmp_path / "f.nii", labels.astype(np.float32)), labels=True)
    assert floats.array.dtype == np.int32 and np.array_equal(floats.array, labels.T)
    one = _xyz((3, 4, 5, 1))  # a singleton 4th axis is squeezed, 2D gets one slice
    assert np.array_equal(read_nifti(_nifti(tmp_path / "1.nii", one)).array, one[..., 0].T)
    assert read_nifti(_nifti(tmp_path / "2d.nii", _xyz((3, 4)))).array.shape == (1, 4, 3)


def test_nifti_and_nrrd_errors(tmp_path):
    bad = np.zeros((3, 4, 5), np.float32)
    bad[1, 1, 1] = 2.5
    with pytest.raises(ValueError, match=r"frac\.nii\.gz: .*non-integer values \(e\.g\. 2\.5"):
        read_nifti(_nifti(tmp_path / "frac.nii.gz", bad), labels=True)
    bad[0, 0, :3] = np.nan
    with pytest.raises(ValueError, match=r"nan\.nii\.gz: 3 of 60 voxels are NaN"):
        read_nifti(_nifti(tmp_path / "nan.nii.gz", bad))
    with pytest.raises(ValueError, match=r"4D NIfTI .*\(3, 4, 5, 2\).*pick a volume"):
        read_nifti(_nifti(tmp_path / "4d.nii.gz", np.zeros((3, 4, 5, 2), np.float32)))
    (tmp_path / "text.nii.gz").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.nii\.gz as NIfTI"):
        read_nifti(tmp_path / "text.nii.gz")
    sd = np.array([[np.nan] * 3, [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])  # NRRD
    hdr = {"kinds": ["vector"] + ["domain"] * 3, "space directions": sd}
    nrrd.write(str(tmp_path / "v.nrrd"), np.zeros((3, 4, 5, 2), np.float32), hdr)
    with pytest.raises(ValueError, match=r"v\.nrrd is not a scalar volume: axis 0 \(kind 'vector'"):
        read_nrrd(tmp_path / "v.nrrd")
    bad[0, 0, :3] = 0.5
    with pytest.raises(ValueError, match=r"f\.nrrd: .*non-integer values \(e\.g\. 0\.5"):
        read_nrrd(_nrrd(tmp_path / "f.nrrd", bad), labels=True)
    bad[1, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"n\.nrrd: 1 of 60 voxels are NaN or infinite"):
        read_nrrd(_nrrd(tmp_path / "n.nrrd", bad))
    (tmp_path / "t.nrrd").write_text("hello")
    with pytest.raises(ValueError, match=r"t\.nrrd as NRRD"):
        read_nrrd(tmp_path / "t.nrrd")


def test_nrrd_lps_oblique_to_ras_and_detached_labels(tmp_path):
    data = _xyz((4, 5, 3), np.int16)
    vol = read_nrrd(_nrrd(tmp_path / "a.nrrd", data))
    assert vol.array.dtype == np.int16 and vol.spacing == pytest.approx((2.0, 0.9, 0.5))
    np.testing.assert_array_equal(vol.array, data.T)
    # LPS -> RAS: voxel (0, 0, 0) at the origin with x, y negated; one x step = first direction
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], [-10, -20, 30, 1])
    np.testing.assert_allclose(vol.affine @ [1, 0, 0, 1] - vol.affine[:, 3], [-0.3, -0.4, 0, 0])
    np.testing.assert_allclose(vol.affine[:3, 1:3], [[0.72, 0], [-0.54, 0], [0, 2.0]])
    ras = read_nrrd(_nrrd(tmp_path / "r.nrrd", data, space="RAS"))
    np.testing.assert_allclose(ras.affine[:3], np.c_[SD.T, [10, 20, 30]])
    labels = data % 3  # detached header + 3D Slicer segment names
    hdr = {"space": "LPS", "Segment0_Name": "liver", "Segment0_LabelValue": "1"}
    nrrd.write(str(tmp_path / "l.nhdr"), labels, hdr, detached_header=True)
    lab = read_volume(tmp_path / "l.nhdr", labels=True)
    assert np.array_equal(lab.array, labels.T) and lab.meta["labels"] == {1: "liver"}
    assert [s.name for s in segments_from_labelmap(lab)] == ["liver", "2"]


def test_npz_roundtrip_and_errors(tmp_path):
    imgs = RNG.integers(0, 255, (3, 4, 5)).astype(np.uint8)
    img, lab = read_npz(_npz(tmp_path / "a.npz", imgs=imgs, gts=imgs % 3, spacing=(0.8, 0.7, 2.5)))
    assert np.array_equal(img.array, imgs) and np.array_equal(lab.array, imgs % 3)
    assert img.spacing == (2.5, 0.7, 0.8) and same_geometry(img, lab)  # MedSAM stores (x, y, z)
    assert read_npz(tmp_path / "a.npz", spacing_order="zyx")[0].spacing == (0.8, 0.7, 2.5)
    rgb, rgb_lab = read_npz(_npz(tmp_path / "c.npz", imgs=np.zeros((4, 5, 3)), gts=np.ones((4, 5))))
    assert rgb.array.shape == (1, 4, 5, 3) and rgb_lab.array.shape == (1, 4, 5)
    assert not rgb.meta["spacing_known"] and rgb.spacing == (1.0, 1.0, 1.0)
    assert img.meta["spacing_known"] and read_npz(_npz(tmp_path / "1.npz", imgs=imgs))[1] is None
    with pytest.raises(ValueError, match=r"no 'imgs' array \(keys found: \['image', 'label'\]\)"):
        read_npz(_npz(tmp_path / "k.npz", image=np.zeros(3), label=np.zeros(3)))
    with pytest.raises(ValueError, match=r"'imgs' holds a Python object array \(pickled"):
        read_npz(_npz(tmp_path / "o.npz", imgs=np.array([{"evil": 1}], dtype=object)))
    with pytest.raises(ValueError, match=r"'gts' has shape \(3, 4, 4\), 'imgs' has \(3, 4, 5\)"):
        read_npz(_npz(tmp_path / "g.npz", imgs=np.zeros((3, 4, 5)), gts=np.zeros((3, 4, 4))))
    with pytest.raises(ValueError, match=r"'spacing' is \[1\.0, 0\.0, 1\.0\]"):
        read_npz(_npz(tmp_path / "s.npz", imgs=np.zeros((3, 4, 5)), spacing=[1.0, 0.0, 1.0]))
    np.save(tmp_path / "p.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"p\.npz as an \.npz archive"):
        read_npz((tmp_path / "p.npy").rename(tmp_path / "p.npz"))


@pytest.mark.parametrize("name", VOLUMES + IMAGES)
def test_read_volume_dispatch(tmp_path, name):
    path, is_2d = tmp_path / name, name in IMAGES
    data = (_xyz((4, 5, 1 if is_2d else 3)) % 4 * 3).astype(np.uint8)  # label ids 0, 3, 6, 9
    if is_2d:
        assert cv2.imwrite(str(path), data.T[0])
    elif name.startswith("v.nii"):
        _nifti(path, data)
    elif name == "v.npz":
        np.savez(path, imgs=data.T, gts=data.T)
    else:
        _nrrd(path, data, detached_header=name.endswith("nhdr"))
    for labels in (False, True):
        vol = read_volume(path, labels=labels)
        assert vol.array.shape == data.T.shape and vol.meta["is_label_map"] is labels
        assert vol.array.dtype.kind in ("iu" if labels else "iuf")
        if not name.endswith(("jpg", "jpeg")):  # lossless: ids kept as they are, not thresholded
            np.testing.assert_array_equal(vol.array, data.T)
        if is_2d:
            assert vol.spacing == (1.0, 1.0, 1.0) and vol.meta["spacing_known"] is False


def test_read_volume_dicom_dispatch_and_errors(tmp_path, monkeypatch):
    calls, stub = [], types.ModuleType("samed2_kit.medbank.io.dicom")
    stub.read_dicom_series = lambda p, series_uid=None: calls.append(Path(p)) or "series"
    monkeypatch.setitem(sys.modules, "samed2_kit.medbank.io.dicom", stub)
    (tmp_path / "x.dcm").write_bytes(b"")
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # no extension
    paths = [tmp_path, tmp_path / "x.dcm", tmp_path / "IM0001"]  # a folder is a series
    assert [read_volume(p) for p in paths] == ["series"] * 3 and calls == paths
    (tmp_path / "notes.xyz").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.xyz: unsupported file type\. Supported formats"):
        read_volume(tmp_path / "notes.xyz")
    (tmp_path / "fake.nii.gz").write_text("hello")
    with pytest.raises(ValueError, match=r"fake\.nii\.gz"):
        read_volume(tmp_path / "fake.nii.gz")
    _nifti(tmp_path / "a.nii", _xyz()).rename(tmp_path / "noext")
    with pytest.raises(ValueError, match=r"noext looks like a NIfTI file"):
        read_volume(tmp_path / "noext")
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        read_volume(tmp_path / "missing.nii")
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 9
    assert cv2.imwrite(str(tmp_path / "c.png"), np.dstack([grey, grey // 2, grey // 3]))
    assert read_volume(tmp_path / "c.png").array.shape == (1, 4, 5, 3)
    with pytest.raises(ValueError, match=r"c\.png is colour with differing channels"):
        read_volume(tmp_path / "c.png", labels=True)
    (tmp_path / "flat.json").write_text('{"1": "liver", "2": "spleen"}')
    assert load_label_names(tmp_path / "flat.json") == {1: "liver", 2: "spleen"}
    (tmp_path / "two.json").write_text('{"a": {"1": "x"}, "b": {"1": "y"}}')
    with pytest.raises(ValueError, match=r"several label tables \['a', 'b'\]: pass key="):
        load_label_names(tmp_path / "two.json")


def _need(*names):
    if not all((DATA / n).exists() for n in names):
        pytest.skip(f"sample data not found under {DATA}")
    return [DATA / n for n in names]


@pytest.mark.parametrize("image", sorted(TOTALSEG))
def test_totalseg_volumes_and_names(image):
    seg_name, key, orient, shape, max_id, count = TOTALSEG[image]
    names = (f"{image}.nii.gz", f"{seg_name}.nii.gz", "label_map_total_and_total_mr.json")
    img_p, seg_p, js = _need(*(f"totalseg_ct_mr/{n}" for n in names))
    img, seg = read_volume(img_p), read_volume(seg_p, labels=True)
    assert img.array.shape == shape and img.spacing == (3.0, 3.0, 3.0) and same_geometry(img, seg)
    assert img.meta["orientation"] == orient and seg.array.dtype == np.uint8
    assert seg.array.max() <= max_id
    segs = segments_from_labelmap(seg, load_label_names(js, key))
    ids = [int(v) for v in np.unique(seg.array) if v]
    assert [s.label_id for s in segs] == ids and len(ids) == count
    by_id = {s.label_id: s for s in segs}
    assert by_id[1].name == "spleen" and by_id[5].name == "liver"
    assert by_id[5].mask.sum() == (seg.array == 5).sum()
    if key == "total":  # CT in HU
        assert by_id[117].name == "costal_cartilages"
        assert -1100 <= np.percentile(img.array, 1) <= -950  # air
        assert 20 < img.array[seg.array == 5].mean() < 80  # liver
    with pytest.raises(ValueError, match=r"keys found: \['total', 'total_mr'\]"):
        load_label_names(js, "ct")


@pytest.mark.parametrize("image,label,values,spacing", PYRADIOMICS)
def test_pyradiomics_pairs(image, label, values, spacing):
    img_p, lab_p = _need(f"pyradiomics_mri/{image}.nrrd", f"pyradiomics_mri/{label}.nrrd")
    img, lab = read_volume(img_p), read_volume(lab_p, labels=True)
    assert same_geometry(img, lab) and img.spacing == pytest.approx(spacing)
    assert set(np.unique(lab.array).tolist()) == values
    assert img.meta["space"] == "left-posterior-superior"


def test_dcmqi_nrrd_labels():
    names = [f"dicom_ct_seg_dcmqi/{n}_seg.nrrd" for n in ("liver", "spine", "heart", "liver_spine")]
    vols = [read_volume(p, labels=True) for p in _need(*names)]
    for vol, values in zip(vols, ({0, 1}, {0, 2}, {0, 3}, {0, 1, 2}), strict=True):
        assert vol.array.shape == (3, 512, 512) and vol.array.dtype == np.int16
        assert set(np.unique(vol.array).tolist()) == values and same_geometry(vol, vols[0])
    assert vols[0].spacing == pytest.approx((1.0, 0.810547, 0.810547))
    np.testing.assert_allclose(vols[0].origin, [235.2, 226.8, -128.69])  # LPS origin, x/y negated
