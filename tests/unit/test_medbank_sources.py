"""Reading side of medbank sources: pair patterns, pixel sizes, mask thresholds and colours, fields
of view, DICOM series choice, case ids and the spec errors that name the file and the key."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from samed2_kit.medbank.cases import load_case, slice_case
from samed2_kit.medbank.layouts import enumerate_cases
from samed2_kit.medbank.spec import ItemSpec, SourceSpec, load_spec
from tests._dicom import write_series


def _img(path: Path, arr: np.ndarray) -> Path:
    """Write an image (grey, or RGB in RGB order) with OpenCV, by the name's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ext = path.suffix.lower()
    tmp = path.with_name("_tmp" + ext) if ext else path
    assert cv2.imwrite(str(tmp), arr)
    tmp.replace(path)  # keep the name's case exactly (a.JPG)
    return path


def _square(hw=(24, 32), box=(4, 14, 6, 20), value=255, dtype=np.uint8) -> np.ndarray:
    m = np.zeros(hw, dtype)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = value
    return m


def _picture(hw=(24, 32)) -> np.ndarray:
    return (np.arange(hw[0] * hw[1]) % 200 + 20).astype(np.uint8).reshape(hw)


def _src(root: Path, **kw) -> SourceSpec:
    base = dict(name="s", layout="pairs", root=str(root), modality="us", task="lesion",
                licence="CC0", image="images/{id}.png", mask="masks/{id}.png")  # fmt: skip
    return SourceSpec(**(base | kw))


def _spec_file(folder: Path, sources: str, split: str = "{train: 0.5, test: 0.5}") -> Path:
    path = folder / "spec.yaml"
    path.write_text(f"split: {split}\nsources:\n{sources}")
    return path


def _sliced(src: SourceSpec):
    """Every case of `src` read and sliced: ({key: SlicedCase}, skipped)."""
    refs, skipped = enumerate_cases(src)
    out = {}
    for ref in refs:
        vol, segs = load_case(ref, src, {})
        out[ref.key] = slice_case(vol, segs, src, seed=0)
    return out, skipped


# ---- patterns: extensions, nothing matched, shared folders ----


def test_extension_matches_in_any_case_ids_do_not(tmp_path):
    _img(tmp_path / "images" / "a.JPG", _picture())  # HRF-style upper-case extension
    _img(tmp_path / "images" / "b.jpg", _picture())
    _img(tmp_path / "images" / "C.jpg", _picture())  # id C: its mask is c.png, not a match
    for name in ("a", "b", "c"):
        _img(tmp_path / "masks" / f"{name}.PNG", _square())
    refs, skipped = enumerate_cases(_src(tmp_path, image="images/{id}.jpg"))
    assert sorted(r.key for r in refs) == ["a", "b"]
    assert Path(refs[0].image).name == "a.JPG" and Path(refs[0].masks[0][1]).name == "a.PNG"
    reasons = {Path(p).name: why for p, why in skipped}
    assert reasons == {"C.jpg": "no mask masks/C.png", "c.PNG": "no image for this mask"}


def test_names_differing_only_in_extension_case_are_ambiguous(tmp_path):
    for name in ("a.png", "a.PNG", "b.png"):
        _img(tmp_path / "images" / name, _picture())
        _img(tmp_path / "masks" / name, _square())
    refs, skipped = enumerate_cases(_src(tmp_path))
    assert sorted(r.key for r in refs) == ["a", "b"]
    assert len(skipped) == 2 and all("extension's case: ambiguous" in w for _, w in skipped)


def test_pattern_matching_nothing_is_one_source_error(tmp_path):
    for name in ("x1.JPG", "x2.JPG"):
        _img(tmp_path / "images" / name, _picture())
        _img(tmp_path / "masks" / (Path(name).stem + ".png"), _square())
    with pytest.raises(ValueError) as err:
        enumerate_cases(_src(tmp_path, image="images/{id}_img.jpg"))
    msg = str(err.value)
    assert msg.startswith("source 's': image pattern 'images/{id}_img.jpg' matched no file under")
    assert "files there look like: x1.JPG, x2.JPG" in msg
    with pytest.raises(ValueError, match="mask pattern 'labels/{id}.png' matched no file .*"):
        enumerate_cases(_src(tmp_path, image="images/{id}.jpg", mask="labels/{id}.png"))
    with pytest.raises(ValueError, match="no image under .* pairs with a mask"):
        enumerate_cases(_src(tmp_path, mask="masks/x{id}.png", image="images/{id}.JPG"))


def test_pattern_matching_nothing_is_one_skip_in_the_build(tmp_path):
    from samed2_kit.medbank.build import build

    for k in range(4):
        _img(tmp_path / "data" / "images" / f"p{k}.JPG", _picture())
        _img(tmp_path / "data" / "masks" / f"p{k}.png", _square())
    spec_path = _spec_file(
        tmp_path,
        "  - {name: good, layout: pairs, root: data, image: 'images/{id}.jpg',"
        " mask: 'masks/{id}.png', modality: us, task: t, licence: CC0}\n"
        "  - {name: typo, layout: pairs, root: data, image: 'imgs/{id}.jpg',"
        " mask: 'masks/{id}.png', modality: us, task: t, licence: CC0}\n",
    )
    spec, sha = load_spec(spec_path)
    report = build(spec, tmp_path / "store", sha, progress=False)
    assert report.samples == 4
    assert len(report.skipped) == 1 and "image pattern 'imgs/{id}.jpg'" in report.skipped[0][1]
    assert "does not exist" in report.skipped[0][1]


def test_two_sources_sharing_a_mask_folder_do_not_report_each_other(tmp_path):
    for name in ("01", "02"):
        _img(tmp_path / "images" / f"{name}.png", _picture())
        _img(tmp_path / "masks" / f"{name}.png", _square())  # vessels
        _img(tmp_path / "masks" / f"{name}_od.png", _square(box=(2, 6, 2, 6)))  # optic disc
    _img(tmp_path / "masks" / "09.png", _square())  # a real orphan
    vessels = _src(tmp_path, name="vessels", mask="masks/{id}.png")
    disc = _src(tmp_path, name="disc", mask="masks/{id}_od.png")
    refs, skipped = enumerate_cases(vessels)
    assert sorted(r.key for r in refs) == ["01", "02"]
    assert [(Path(p).name, w) for p, w in skipped] == [("09.png", "no image for this mask")]
    refs, skipped = enumerate_cases(disc)
    assert [Path(r.masks[0][1]).name for r in refs] == ["01_od.png", "02_od.png"]
    assert skipped == []


# ---- pixel size ----


def test_spacing_one_value_or_row_col(tmp_path):
    for name in ("a", "b"):
        _img(tmp_path / "images" / f"{name}.png", _picture())
        _img(tmp_path / "masks" / f"{name}.png", _square())
    cases, _ = _sliced(_src(tmp_path, spacing=0.25))
    assert cases["a"].spacing == (1.0, 0.25, 0.25) and cases["a"].spacing_known
    cases, _ = _sliced(_src(tmp_path, spacing=[0.5, 0.25]))
    assert cases["b"].spacing == (1.0, 0.5, 0.25) and cases["b"].spacing_known
    cases, _ = _sliced(_src(tmp_path))
    assert cases["a"].spacing == (1.0, 1.0, 1.0) and not cases["a"].spacing_known


def test_spacing_csv_format_and_missing_rows(tmp_path):
    for name in ("a", "b", "c"):
        _img(tmp_path / "images" / f"{name}.PNG", _picture())
        _img(tmp_path / "masks" / f"{name}.png", _square())
    # header words in any case; a folder in the name; a row without extension; extra columns
    (tmp_path / "px.csv").write_text(
        "Image File,Pixel Spacing (mm),notes\nsub/a.png,0.2,x\nb,0.3,y\nz.png,0.9,\n"
    )
    refs, skipped = enumerate_cases(_src(tmp_path, spacing_csv="px.csv"))
    assert {r.key: r.spacing_yx for r in refs} == {"a": (0.2, 0.2), "b": (0.3, 0.3)}
    assert len(skipped) == 1 and Path(skipped[0][0]).name == "c.PNG"
    assert "no row for 'c.PNG' in spacing CSV" in skipped[0][1]
    assert "remove spacing_csv" in skipped[0][1]
    (tmp_path / "none.csv").write_text("filename,pixel size(mm)\nq.png,0.2\n")
    with pytest.raises(ValueError, match="no row names any of the 3 paired images"):
        enumerate_cases(_src(tmp_path, spacing_csv="none.csv"))
    (tmp_path / "bad.csv").write_text("filename,pixel size(mm)\na.png,0.2\nb.png,abc\n")
    with pytest.raises(ValueError, match=r"bad.csv line 3: pixel size 'abc' of 'b.png'"):
        enumerate_cases(_src(tmp_path, spacing_csv="bad.csv"))
    (tmp_path / "two.csv").write_text("filename,spacing\na.png,0.2\na.png,0.3\n")
    with pytest.raises(ValueError, match="'a.png' has two pixel sizes"):
        enumerate_cases(_src(tmp_path, spacing_csv="two.csv"))
    (tmp_path / "hdr.csv").write_text("id,size\na.png,0.2\n")
    with pytest.raises(ValueError, match="needs a file-name column"):
        enumerate_cases(_src(tmp_path, spacing_csv="hdr.csv"))
    with pytest.raises(FileNotFoundError, match="nope.csv does not exist"):
        enumerate_cases(_src(tmp_path, spacing_csv="nope.csv"))


# ---- mask values ----


def test_mask_threshold_8_and_16_bit(tmp_path):
    levels = np.zeros((24, 32), np.uint8)
    levels[2:8, 2:8], levels[10:16, 10:16] = 100, 200  # 36 px at 100, 36 px at 200
    _img(tmp_path / "images" / "a.png", _picture())
    _img(tmp_path / "masks" / "a.png", levels)
    area = lambda src: int(_sliced(src)[0]["a"].samples[0][3].sum())  # noqa: E731
    assert area(_src(tmp_path)) == 36  # default 127: only 200
    assert area(_src(tmp_path, mask_threshold=50)) == 72
    wide = np.zeros((24, 32), np.uint16)
    wide[2:8, 2:8], wide[10:16, 10:16] = 20000, 65535
    _img(tmp_path / "masks" / "a.png", wide)  # 16-bit: threshold * 257 = 32639 by default
    assert area(_src(tmp_path)) == 36
    assert area(_src(tmp_path, mask_threshold=50)) == 72  # 50 * 257 = 12850 < 20000
    _img(tmp_path / "masks" / "a.png", (levels > 0).astype(np.uint16) * 255)  # 8-bit in 16
    assert area(_src(tmp_path)) == 72
    small = np.zeros((24, 32), np.uint16)
    small[2:8, 2:8] = 1000
    small[0, 0] = 300
    _img(tmp_path / "masks" / "a.png", small)
    src = _src(tmp_path)
    (ref,), _ = enumerate_cases(src)
    with pytest.raises(ValueError, match="<= threshold 32639 .*mask_threshold"):
        load_case(ref, src, {})
    assert area(_src(tmp_path, mask_threshold=0)) == 37


def _colour_pair(root: Path) -> np.ndarray:
    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[2:8, 2:8] = (255, 0, 0)  # artery, 36 px
    rgb[10:20, 10:20] = (0, 0, 255)  # vein, 100 px
    _img(root / "images" / "a.png", _picture())
    _img(root / "masks" / "a.png", rgb)
    return rgb


def test_colour_masks_need_a_channel_or_colours(tmp_path):
    _colour_pair(tmp_path)
    src = _src(tmp_path)
    (ref,), _ = enumerate_cases(src)
    with pytest.raises(ValueError) as err:
        load_case(ref, src, {})
    assert "is a colour mask" in str(err.value) and "mask_channel" in str(err.value)
    assert "mask_colors" in str(err.value) and "[0, 0, 255]" in str(err.value)
    red = _sliced(_src(tmp_path, mask_channel=0))[0]["a"]
    assert [(n, int(m.sum())) for _, n, _, m in red.samples] == [("lesion", 36)]
    colours = _src(tmp_path, mask_colors={"artery": [255, 0, 0], "vein": [0, 0, 255]})
    both = _sliced(colours)[0]["a"]
    assert [(i, n, int(m.sum())) for i, n, _, m in both.samples] == [
        (1, "artery", 36),
        (2, "vein", 100),
    ]
    only_vein = _src(tmp_path, mask_colors={"vein": [0, 0, 255]})
    (ref,), _ = enumerate_cases(only_vein)
    with pytest.raises(ValueError, match=r"not within 32 of black or of a colour .*\[255, 0, 0\]"):
        load_case(ref, only_vein, {})


def test_grey_mask_saved_as_rgb_reads_as_before(tmp_path):
    grey = _square()
    _img(tmp_path / "images" / "a.png", _picture())
    _img(tmp_path / "masks" / "a.png", np.repeat(grey[:, :, None], 3, axis=2))
    case = _sliced(_src(tmp_path))[0]["a"]
    np.testing.assert_array_equal(case.samples[0][3], grey > 0)


def test_colour_masks_end_to_end(tmp_path):
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.store import open_store

    for k in range(2):
        _colour_pair(tmp_path / "data" / f"p{k}")
    spec_path = _spec_file(
        tmp_path,
        "  - {name: av, layout: pairs, root: data, image: '{id}/images/a.png',"
        " mask: '{id}/masks/a.png', spacing: [0.5, 0.25], modality: fundus, task: vessels,"
        " licence: CC0, mask_colors: {artery: [255, 0, 0], vein: [0, 0, 255],"
        " background: [0, 0, 0]}}\n"
        "  - {name: grey, layout: pairs, root: data, image: '{id}/images/a.png',"
        " mask: '{id}/masks/a.png', modality: fundus, task: vessels, licence: CC0}\n",
    )
    spec, sha = load_spec(spec_path)
    report = build(spec, tmp_path / "store", sha, progress=False)
    assert report.samples == 4  # 2 images x 2 colours; the source without colours is skipped
    assert len(report.skipped) == 2 and all("mask_colors" in w for _, w in report.skipped)
    _, _, samples = open_store(tmp_path / "store")
    assert sorted(samples["label"]) == ["artery", "artery", "vein", "vein"]
    assert all(s == pytest.approx([1.0, 0.5, 0.25]) for s in samples["spacing"])


def test_mask_colors_with_label_placeholder_is_a_spec_error(tmp_path):
    with pytest.raises(ValueError, match=r"mask_colors names the labels .* takes no \{label\}"):
        _src(tmp_path, mask="masks/{id}_{label}.png", mask_colors={"a": [255, 0, 0]})


# ---- field of view ----


def _hrf_like(root: Path, names=("01_h", "02_h"), fov_hw=(24, 32)) -> None:
    for name in names:
        _img(root / "images" / f"{name}.JPG", np.stack([_picture()] * 3, axis=2))
        _img(root / "manual1" / f"{name}.tif", _square())
        fov = np.zeros(fov_hw, np.uint8)
        fov[1:-1, 2:-2] = 255
        _img(root / "mask" / f"{name}_mask.tif", fov)


def test_fov_is_read_with_its_image(tmp_path):
    _hrf_like(tmp_path)
    src = _src(tmp_path, image="images/{id}.jpg", mask="manual1/{id}.tif",
               fov="mask/{id}_mask.tif")  # fmt: skip
    refs, skipped = enumerate_cases(src)
    assert skipped == [] and Path(refs[0].fov).name == "01_h_mask.tif"
    cases, _ = _sliced(src)
    case = cases["01_h"]
    assert case.fov.shape == (1, 24, 32) and case.fov.dtype == bool
    assert case.images.shape[:3] == case.fov.shape
    assert (
        case.fov[0, 1:-1, 2:-2].all() and not case.fov[0, 0].any() and not case.fov[0, :, :2].any()
    )
    assert (
        _sliced(_src(tmp_path, image="images/{id}.jpg", mask="manual1/{id}.tif"))[0]["01_h"].fov
        is None
    )


def test_missing_or_misfit_fov(tmp_path):
    _hrf_like(tmp_path)
    (tmp_path / "mask" / "02_h_mask.tif").unlink()
    src = _src(tmp_path, image="images/{id}.jpg", mask="manual1/{id}.tif",
               fov="mask/{id}_mask.tif")  # fmt: skip
    refs, skipped = enumerate_cases(src)
    assert [r.key for r in refs] == ["01_h"]
    assert skipped == [
        (str(tmp_path / "images" / "02_h.JPG"),
         f"no field-of-view mask {tmp_path / 'mask' / '02_h_mask.tif'} (spec key "
         "fov='mask/{id}_mask.tif'): add the file or remove fov"),
    ]  # fmt: skip
    _img(tmp_path / "mask" / "01_h_mask.tif", np.full((20, 32), 255, np.uint8))
    with pytest.raises(ValueError, match=r"field-of-view mask .*01_h_mask.tif is 20x32 \(HxW\)"):
        load_case(refs[0], src, {})
    with pytest.raises(ValueError, match="fov pattern 'fov/{id}.png' matched no file"):
        enumerate_cases(_src(tmp_path, image="images/{id}.jpg", mask="manual1/{id}.tif",
                             fov="fov/{id}.png"))  # fmt: skip


def test_fov_files_beside_images_are_not_images(tmp_path):
    for name in ("a", "b"):
        _img(tmp_path / f"{name}.png", _picture())
        _img(tmp_path / f"{name}_fov.png", np.full((24, 32), 255, np.uint8))
        _img(tmp_path / f"{name}_seg.png", _square())
    src = _src(tmp_path, image="{id}.png", mask="{id}_{label}.png", fov="{id}_fov.png")
    refs, skipped = enumerate_cases(src)
    assert skipped == [] and sorted(r.key for r in refs) == ["a", "b"]
    assert [lab for lab, _ in refs[0].masks] == ["seg"]


# ---- DICOM series, case ids ----


def test_series_uid_of_an_item_picks_the_series(tmp_path):
    pytest.importorskip("pydicom")
    import nibabel as nib

    from samed2_kit.medbank.io import read_volume

    uids = ("1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.202")
    for uid, value in zip(uids, (100, 300), strict=True):
        write_series(tmp_path / "ct", uid, value=value)
    vol = read_volume(tmp_path / "ct", series_uid=uids[1])
    lab = np.zeros(vol.shape_zyx, np.uint8)
    lab[:, 4:10, 4:10] = 1
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), vol.affine), str(tmp_path / "lab.nii.gz"))
    item = dict(id="p1", image="ct", mask="lab.nii.gz")
    src = _src(tmp_path, layout="volumes", image=None, mask=None, modality="ct",
               items=[ItemSpec(**item, series_uid=uids[1])], labels={1: "liver"})  # fmt: skip
    (ref,), _ = enumerate_cases(src)
    assert ref.series_uid == uids[1]
    vol, segs = load_case(ref, src, {1: "liver"})
    assert np.allclose(vol.array, 300) and segs[0].mask.sum() == 3 * 36
    both = _src(tmp_path, layout="volumes", image=None, mask=None, modality="ct",
                items=[ItemSpec(**item)])  # fmt: skip
    (ref,), _ = enumerate_cases(both)
    with pytest.raises(ValueError, match="series"):
        load_case(ref, both, {1: "liver"})


def test_case_ids_from_the_case_regex(tmp_path):
    for name in ("010_HC", "010_2HC", "011_HC"):
        _img(tmp_path / "images" / f"{name}.png", _picture())
        _img(tmp_path / "masks" / f"{name}.png", _square())
    refs, _ = enumerate_cases(_src(tmp_path, case=r"^(\d+)"))
    assert {r.key: r.case_id for r in refs} == {"010_2HC": "010", "010_HC": "010", "011_HC": "011"}
    _img(tmp_path / "images" / "x_HC.png", _picture())
    _img(tmp_path / "masks" / "x_HC.png", _square())
    with pytest.raises(ValueError, match=r"source 's': case regex .* no group 1 in id 'x_HC'"):
        enumerate_cases(_src(tmp_path, case=r"^(\d+)"))


def test_case_regex_must_fit_every_volume_id(tmp_path):
    src = _src(tmp_path, layout="volumes", image=None, mask=None, modality="ct", case=r"^(p\d+)_",
               items=[ItemSpec(id="p1_a", image="a.nii.gz", mask="a_lab.nii.gz"),
                      ItemSpec(id="q_b", image="b.nii.gz", mask="b_lab.nii.gz")])  # fmt: skip
    with pytest.raises(ValueError, match="source 's': case regex .* no group 1 in id 'q_b'"):
        enumerate_cases(src)


# ---- spec errors name the file and the key ----

_SRC = "{name: s, layout: pairs, root: d, image: 'i/{id}.png', mask: 'm/{id}.png', modality: us, task: t, licence: CC0"

BAD_SPECS = [
    (_SRC.replace("layout: pairs", "layout: folder") + "}", "layout='folder'; choose one of"),
    (_SRC.replace("modality: us", "modality: ultrasound") + "}", "unknown modality 'ultrasound'"),
    (_SRC + ", axis: 3}", "axis=3; use 0 (z)"),
    (_SRC + ", split: {train: 0.8, val: 0.5}}", "split={'train': 0.8, 'val': 0.5} sums to 1.3"),
    (_SRC + ", split: {train: 1.2, test: -0.2}}", "has negative fractions {'test': -0.2}"),
    (_SRC + ", mask_threshold: 300}", "mask_threshold=300; give 0..254"),
    (_SRC + ", mask_channel: 3}", "mask_channel=3; use 0 (R), 1 (G) or 2 (B)"),
    (_SRC + ", mask_colors: {a: [255, 0]}}", "mask_colors['a']=[255, 0]; give [r, g, b]"),
    (_SRC + ", mask_colors: {a: [255, 0, 0], b: [255, 0, 0]}}", "one colour to two labels"),
    (_SRC + ", spacing: -1}", "spacing=-1; give the pixel size in mm"),
    (_SRC + ", spacing: abc}", "spacing=abc; give the pixel size in mm"),
    (_SRC + ", spacing: 0.5, spacing_csv: px.csv}", "give spacing or spacing_csv, not both"),
    (_SRC + ", fov: 'fov/x.png'}", "fov='fov/x.png' needs exactly one {id}"),
    (_SRC.replace("'m/{id}.png'", "'m/{name}.png'") + "}", "mask='m/{name}.png' needs exactly"),
    (_SRC + ", case: '^\\d+'}", "case='^\\\\d+' has no group"),
    (_SRC + ", case: '^(\\d+'}", "is not a valid regex"),
    (_SRC.replace("layout: pairs", "layout: volumes") + ", spacing: 0.5}", "spacing: only layout pairs (2D image/mask files) reads this key"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "expected"), BAD_SPECS)
def test_bad_specs_name_the_file_and_the_key(tmp_path, source, expected):
    path = _spec_file(tmp_path, f"  - {source}\n")
    with pytest.raises(ValueError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("{train: 0.8, val: 0.5}", "split={'train': 0.8, 'val': 0.5} sums to 1.3"),
        ("{train: 0.9, test: -0.1, val: 0.2}", "has negative fractions {'test': -0.1}"),
        ("{}", "split={} is empty"),
    ],
)
def test_bad_spec_split(tmp_path, split, expected):
    path = _spec_file(tmp_path, f"  - {_SRC}}}\n", split=split)
    with pytest.raises(ValueError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)


def test_fov_end_to_end(tmp_path):
    """HRF-like source (upper-case .JPG, TIFF masks, a field of view) built into a store."""
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.store import open_store

    _hrf_like(tmp_path / "hrf")
    spec_path = _spec_file(
        tmp_path,
        "  - {name: hrf, layout: pairs, root: hrf, image: 'images/{id}.jpg',"
        " mask: 'manual1/{id}.tif', fov: 'mask/{id}_mask.tif', spacing: 0.006,"
        " modality: fundus, task: vessels, licence: CC-BY-4.0}\n",
    )
    spec, sha = load_spec(spec_path)
    report = build(spec, tmp_path / "store", sha, progress=False)
    assert report.samples == 2 and report.skipped == []
    _, images, _ = open_store(tmp_path / "store")
    fov = np.asarray(images[0]["fov"])
    assert fov.shape == (24, 32) and fov[1:-1, 2:-2].all() and not fov[0].any()
