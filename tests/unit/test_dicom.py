"""medbank.io.dicom / dicom_seg / rtstruct on pydicom's files, ../shared/data and synthetic files."""

import logging
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder, pack_bits
from pydicom.uid import CTImageStorage, JPEGLSLossless, SegmentationStorage, generate_uid
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT

from samed2_kit.medbank.io.dicom import find_series, read_dicom_series
from samed2_kit.medbank.io.dicom_seg import read_dicom_seg
from samed2_kit.medbank.io.rtstruct import read_rtstruct
from samed2_kit.medbank.io.volume import Volume, affine_from_spacing

FOR = "1.2.826.0.1.3680043.8.498.1"


def _pd(name: str) -> Path:
    if (path := get_testdata_file(name, download=False)) is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return Path(path)


def _fails(match: str, fn, *args) -> None:
    with pytest.raises(ValueError, match=match):
        fn(*args)


def _ds(**attrs) -> Dataset:
    (ds := Dataset()).update(attrs)
    return ds


def _file(path, sop_class, **attrs) -> Dataset:
    """A minimal dataset saved to `path` with the DICM preamble (pydicom fills the file meta)."""
    ds = _ds(SOPClassUID=sop_class, SOPInstanceUID=generate_uid(), **attrs)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.save_as(path, enforce_file_format=True)
    return ds


def _series(folder: Path, zs, uid="1.2.826.0.1.3680043.8.498.7") -> list[Dataset]:
    """8x6 CT slices at z (LPS mm), value 10 * index in `zs` - 1024 HU; file names and
    InstanceNumber run opposite to the list order, so sorting must use positions."""
    folder.mkdir(parents=True, exist_ok=True)
    return [_file(
        folder / f"{len(zs) - k:03d}.dcm", CTImageStorage, Modality="CT", SeriesInstanceUID=uid,
        StudyInstanceUID="1.2.3", FrameOfReferenceUID=FOR, InstanceNumber=len(zs) - k,
        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-10, -20, z],
        PixelSpacing=[0.5, 0.7], SliceThickness=2, Rows=8, Columns=6, SamplesPerPixel=1,
        PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
        PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1024,
        PixelData=np.full((8, 6), 10 * k, np.int16).tobytes(),
    ) for k, z in enumerate(zs)]  # fmt: skip


def _seg(path, frames, frac=False, for_uid=FOR):
    """An 8x6 DICOM-SEG; frames: (segment number, z mm or None, source SOP UID, mask)."""
    per = [_ds(
        SegmentIdentificationSequence=[_ds(ReferencedSegmentNumber=num)],
        DerivationImageSequence=[_ds(SourceImageSequence=[_ds(ReferencedSOPInstanceUID=sop)])],
        PlanePositionSequence=[] if z is None else [_ds(ImagePositionPatient=[-10, -20, z])],
    ) for num, z, sop, _ in frames]  # fmt: skip
    shared = _ds(PlaneOrientationSequence=[_ds(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])])
    stack, bits = np.stack([f[3] for f in frames]).astype(np.uint8), 8 if frac else 1
    _file(
        path, SegmentationStorage, Modality="SEG", FrameOfReferenceUID=for_uid, Rows=8, Columns=6,
        NumberOfFrames=len(frames), SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
        BitsAllocated=bits, BitsStored=bits, HighBit=bits - 1, PixelRepresentation=0,
        SegmentSequence=[_ds(SegmentNumber=n, SegmentLabel=f"organ{n}") for n in (1, 2)],
        SegmentationType="FRACTIONAL" if frac else "BINARY", MaximumFractionalValue=200,
        SharedFunctionalGroupsSequence=[shared], PerFrameFunctionalGroupsSequence=per,
        PixelData=(stack * 120).tobytes() if frac else pack_bits(stack),
    )  # fmt: skip


def test_ct_small_hu_spacing_affine():
    v = read_dicom_series(_pd("CT_small.dcm"))
    assert v.array.shape == (1, 128, 128) and v.array.dtype == np.float32
    assert (v.array.min(), v.array.max()) == (-896.0, 1167.0)  # stored 128..2191, intercept -1024
    assert v.spacing[1:] == pytest.approx((0.661468, 0.661468))
    assert v.affine[0, 0] < 0 and v.affine[1, 1] < 0  # LPS row/col cosines (1,0,0), (0,1,0) -> RAS


@pytest.mark.parametrize("name", ["RLE", "jp2klossless", "bigendian", "implicit"])
def test_mr_small_transfer_syntaxes_decode_equal(name):
    ref = read_dicom_series(_pd("MR_small.dcm"))
    v = read_dicom_series(_pd(f"MR_small_{name}.dcm"))
    np.testing.assert_array_equal(v.array, ref.array)
    assert v.spacing == ref.spacing and v.meta["window"] == (600.0, 1600.0)


def test_missing_decoder_and_truncated_file_are_named():
    _fails(r"MR_truncated\.dcm.*truncated", read_dicom_series, _pd("MR_truncated.dcm"))
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    with pytest.raises(ValueError, match=r"MR_small_jpeg_ls_lossless\.dcm.*JPEG-LS.*pyjpegls"):
        read_dicom_series(_pd("MR_small_jpeg_ls_lossless.dcm"))


def test_dicomdir_series_sorted_by_position_not_instance_number():
    folder = _pd("dicomdirtests/98892001/CT5N/2062").parent
    v = read_dicom_series(folder)
    assert v.array.shape == (5, 16, 16) and v.spacing[0] == pytest.approx(2.5)
    z = [p[2] for p in v.meta["positions"]]
    assert z == pytest.approx([-1.2375, 1.2625, 3.7625, 6.2625, 8.7625])  # InstanceNumber 10..6
    assert [Path(f).name for f in v.meta["files"]] == ["3353", "3023", "2693", "2392", "2062"]
    np.testing.assert_allclose(v.affine[:3, 2], [0, 0, 2.5], atol=1e-6)
    np.testing.assert_allclose(v.affine[:3, 3], [72.2, 143.0, -1.2375], atol=1e-4)  # RAS origin
    last = pydicom.dcmread(folder / "2062")
    np.testing.assert_array_equal(v.array[-1], last.pixel_array * last.RescaleSlope - 1024)


def test_real_series_problems_are_named():
    base = _pd("dicomdirtests/DICOMDIR").parent
    with pytest.raises(ValueError, match=r"CT2: gap in slice positions.*-99\.48.*103\.02"):
        read_dicom_series(base / "77654033" / "CT2")  # 4 files: 1 slice far below 3 contiguous
    _fails(r"3 series.*0\.481.*0\.136.*0\.17 ", read_dicom_series, mr2 := base / "98892003" / "MR2")
    uid = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148"
    assert read_dicom_series(mr2, uid + ".0.481").array.shape == (1, 16, 16)
    _fails("ImageOrientationPatient differs", read_dicom_series, mr2, uid + ".0.136")  # T/S/C
    series = find_series(base)  # DICOMDIRs and the pixel-less TINY_ALPHA files are skipped
    assert len(series) == 13 and sum(s.n_slices for s in series) == 31


def test_synthetic_series_sorting_and_bad_inputs(tmp_path):
    _series(tmp_path / "ok", [4.0, -2.0, 0.0, 2.0])
    (tmp_path / "ok" / "notes.txt").write_text("not DICOM\n" * 20)  # ignored
    v = read_dicom_series(tmp_path / "ok")
    assert v.spacing == pytest.approx((2.0, 0.5, 0.7))
    np.testing.assert_array_equal(v.array[:, 1, 1], [-1014, -1004, -994, -1024])  # z -2, 0, 2, 4
    _series(tmp_path / "gap", [0.0, 2.0, 6.0, 8.0])
    _fails(r"gap.*\(-10.00, -20.00, 2.00\) and \(.*6.00\)", read_dicom_series, tmp_path / "gap")
    _series(tmp_path / "dup", [0.0, 2.0, 2.0, 4.0])
    _fails("duplicate slice positions", read_dicom_series, tmp_path / "dup")
    _series(tmp_path / "two", [0.0, 2.0], uid="1.2.826.0.1.3680043.8.498.8")
    _series(tmp_path / "two" / "b", [0.0, 2.0, 4.0], uid="1.2.826.0.1.3680043.8.498.9")
    _fails(r"2 series.*498\.8 .*498\.9 ", read_dicom_series, tmp_path / "two")
    raw = (tmp_path / "ok" / "002.dcm").read_bytes()
    (tmp_path / "ok" / "002.dcm").write_bytes(raw[:-30])  # cut inside the pixel data
    _fails(r"002\.dcm: cannot decode PixelData", read_dicom_series, tmp_path / "ok")
    (tmp_path / "ok" / "002.dcm").write_bytes(raw[:400])  # cut inside the header
    _fails(r"002\.dcm: CT Image Storage header stops", read_dicom_series, tmp_path / "ok")


def test_synthetic_seg_frames_placed_by_position_and_uid(tmp_path):
    ds = _series(tmp_path / "ct", [0.0, 2.0, 4.0])
    ref = read_dicom_series(tmp_path / "ct")
    a, b = np.zeros((8, 6), bool), np.zeros((8, 6), bool)
    a[1:3, 1:4], b[5:7, 2:5] = True, True
    frames = [(2, 4.0, "1.2.3.4", b), (1, 2.0, "1.2.3.4", a), (1, None, ds[0].SOPInstanceUID, b)]
    _seg(tmp_path / "s.dcm", frames, frac=True)  # reversed z; 120 >= 200/2 counts as inside
    s1, s2 = read_dicom_seg(tmp_path / "s.dcm", ref)
    assert (s1.label_id, s1.name, s2.name) == (1, "organ1", "organ2")
    np.testing.assert_array_equal(s1.mask, np.stack([b, a, 0 * a]))
    np.testing.assert_array_equal(s2.mask, np.stack([0 * a, 0 * a, b]))
    _seg(tmp_path / "off.dcm", [(1, 9.0, "1.2.3.4", a)])
    _fails(r"off\.dcm: 1 of 1 frames match no reference", read_dicom_seg, tmp_path / "off.dcm", ref)
    _seg(bad := tmp_path / "for.dcm", [(1, 2.0, "1.2.3.4", a)], for_uid=FOR + ".99")
    _fails(r"for\.dcm: FrameOfReferenceUID .*498\.1\.99 differs", read_dicom_seg, bad, ref)


def test_totalseg_jpeg2000_series(shared_data):
    v = read_dicom_series(shared_data / "totalseg_ct_mr" / "example_ct_dicom")
    assert v.array.shape == (20, 512, 512) and v.spacing == pytest.approx((2, 0.9765625, 0.9765625))
    assert v.array.min() == -1024 and v.array[:, :20, :20].mean() < -950  # air in the corner
    img = nib.load(shared_data / "totalseg_ct_mr" / "example_seg_dicom.nii.gz")  # 512x512x20
    for i, j, k in [(0, 0, 0), (37, 400, 11), (511, 511, 19)]:  # NIfTI stores rows bottom-up
        np.testing.assert_allclose(img.affine @ [i, j, k, 1], v.affine @ [i, 511 - j, k, 1])
    labels = np.asarray(img.dataobj)[:, ::-1, :].transpose(2, 1, 0)  # -> (z, y, x)
    assert 40 < v.array[labels == 5].mean() < 150  # liver (contrast CT) in HU


def test_dcmqi_seg_matches_nrrd_despite_reversed_frames(shared_data):
    root = shared_data / "dicom_ct_seg_dcmqi"
    ct = read_dicom_series(root / "ct-3slice")
    assert [Path(f).name for f in ct.meta["files"]] == ["03.dcm", "02.dcm", "01.dcm"]
    (liver,) = read_dicom_seg(root / "liver.dcm", ct)
    data, hdr = nrrd.read(str(root / "liver_seg.nrrd"))  # (x, y, z), origin z = -128.69 ascending
    assert hdr["space"] == "left-posterior-superior" and hdr["space origin"][2] == -128.69
    ref = data.transpose(2, 1, 0) == 1
    assert liver.name == "Liver" and (liver.mask == ref).all()  # Dice 1.0
    assert liver.mask.sum(axis=(1, 2)).tolist() == [36233, 35645, 35220]
    flipped = Volume(ct.array[::-1], ct.spacing, ct.affine @ np.diag([1, 1, -1, 1]), dict(ct.meta))
    flipped.affine[:3, 3] = ct.affine[:3, 3] + 2 * ct.affine[:3, 2]  # same slices, z reversed
    flipped.meta["positions"] = ct.meta["positions"][::-1]
    np.testing.assert_array_equal(read_dicom_seg(root / "liver.dcm", flipped)[0].mask, ref[::-1])
    (one,) = read_dicom_seg(_pd("liver_1frame.dcm"), ct)  # dcmqi's first frame: z = -128.69
    assert one.mask.sum(axis=(1, 2)).tolist() == [36233, 0, 0]


def _shoelace_mm2(ds, roi: int, z: float) -> list[float]:
    """Polygon areas (mm^2) of ROI `roi`'s contours at z (LPS mm)."""
    rc = next(r for r in ds.ROIContourSequence if r.ReferencedROINumber == roi)
    pts = [np.asarray(c.ContourData, float).reshape(-1, 3) for c in rc.ContourSequence]
    xys = [(p[:, 0], p[:, 1]) for p in pts if abs(p[0, 2] - z) < 0.5]
    return [0.5 * abs(x @ np.roll(y, 1) - y @ np.roll(x, 1)) for x, y in xys]


def test_rtstruct_phantom_ring_with_hole(shared_data, caplog):
    root = shared_data / "dicom_rtstruct" / "rtutils_phantom"
    ct = read_dicom_series(root)
    with caplog.at_level(logging.WARNING):
        (roi,) = read_rtstruct(root / "rt.dcm", ct)  # its FrameOfReferenceUID differs (rt-utils)
    assert "names the reference series" in caplog.text
    assert roi.name == "ROI-1" and roi.mask[1].sum() == 0 and roi.mask[0].sum() > 0
    assert not roi.mask[0, 176, 176] and roi.mask[0, 153, 176]  # hole in the middle, ring around
    outer, inner = _shoelace_mm2(pydicom.dcmread(root / "rt.dcm"), 1, 60.0)  # square, octagon
    assert outer == 576.0 and roi.mask.sum() * 0.488281**2 == pytest.approx(outer - inner, rel=0.05)
    assert abs(ct.array[roi.mask].mean()) < 50  # the contoured insert is water-like


def test_rtstruct_breast_body_and_names(shared_data, tmp_path):
    root = shared_data / "dicom_rtstruct" / "dicompyler_breast"
    ct = read_dicom_series(root)
    segs = read_rtstruct(root / "rtss.dcm", ct)
    assert [s.name for s in segs] == ["BODY"]  # the other 9 ROIs have no contour on this slice
    body = segs[0].mask[0]
    ds = pydicom.dcmread(root / "rtss.dcm", force=True)
    assert body.sum() * ct.spacing[1] * ct.spacing[2] == pytest.approx(
        sum(_shoelace_mm2(ds, 1, 168.56)), rel=0.05
    )  # 4 disjoint parts
    bright = ct.array[0] > -300
    assert (bright & body).sum() / body.sum() > 0.95 and (bright & body).sum() / bright.sum() > 0.9
    assert read_rtstruct(root / "rtss.dcm", ct, names=["heart"]) == []
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.999"
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence = []
    for item in ds.StructureSetROISequence:
        item.ReferencedFrameOfReferenceUID = "1.2.3.999"
    ds.save_as(other := tmp_path / "other.dcm")
    _fails(r"other\.dcm: .*1\.2\.3\.999.*differs.*1241703565\.36", read_rtstruct, other, ct)


def test_pydicom_rtstruct_without_preamble_skips_points():
    uid = "1.2.826.0.1.3680043.8.498.2010020400001.2"  # rtstruct.dcm: rectangle 400 x 300 mm
    ras = affine_from_spacing((10, 2, 2), (250, 200, -200), np.diag([-1, -1, 1]))  # LPS -250, -200
    ref = Volume(np.zeros((4, 201, 251)), (10, 2, 2), ras, {"frame_of_reference_uid": uid})
    (patient,) = read_rtstruct(_pd("rtstruct.dcm"), ref)  # Isocenter 1/2 are POINT ROIs
    assert patient.name == "patient" and patient.mask.sum(axis=(1, 2)).tolist()[3] == 0
    assert patient.mask[0, 100, 30] and not patient.mask[0, 20, 100]  # x spans cols, y rows
    assert patient.mask[:3].sum(axis=(1, 2)) == pytest.approx([150 * 200] * 3, rel=0.02)
