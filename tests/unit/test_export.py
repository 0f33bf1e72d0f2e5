"""samed2_kit.export: NIfTI and DICOM-SEG round trips through the medbank readers."""

from pathlib import Path

import highdicom
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from samed2_kit.export import write_dicom_seg, write_nifti
from samed2_kit.medbank.io.dicom import read_dicom_series
from samed2_kit.medbank.io.dicom_seg import read_dicom_seg
from samed2_kit.medbank.io.labels import load_label_names
from samed2_kit.medbank.io.nifti import read_nifti
from samed2_kit.medbank.io.volume import Volume, affine_from_spacing, same_geometry

CT = Path(__file__).resolve().parents[2] / "samed2_kit/sample_data/totalseg/example_ct_sm.nii.gz"
SERIES_UID = "1.2.826.0.1.3680043.8.498.70"


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _ct_series(folder: Path, zs, iop=(1, 0, 0, 0, 1, 0)) -> None:
    """8x6 CT slices at distance z (mm) along the normal of `iop`, one file per z in list order
    (so file names do not follow the slice order when `zs` is shuffled)."""
    folder.mkdir(parents=True)
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    for k, z in enumerate(zs):
        ds = Dataset()
        ds.update(dict(
            SOPClassUID=CTImageStorage, SOPInstanceUID=generate_uid(), Modality="CT",
            SeriesInstanceUID=SERIES_UID, StudyInstanceUID="1.2.3", FrameOfReferenceUID="1.2.4",
            PatientID="p1", InstanceNumber=k + 1, ImageOrientationPatient=list(iop),
            ImagePositionPatient=[float(v) for v in [-10, -20, 5] + z * np.cross(row, col)],
            PixelSpacing=[0.5, 0.7], SliceThickness=2, Rows=8, Columns=6, SamplesPerPixel=1,
            PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16, HighBit=15,
            PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1024,
            PixelData=np.full((8, 6), 10 * k, np.int16).tobytes(),
        ))  # fmt: skip
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


def _two_labels(shape) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[0, 1:4, 1:3] = 1
    m[2, 2:6, 2:5] = 1
    m[2, 6:8, 0:2] = 2
    m[3, 0:2, 4:6] = 2  # slice 1 stays empty
    return m


def test_nifti_round_trip_on_sample_ct(tmp_path):
    ref = read_nifti(CT)
    mask = (ref.array > -100).astype(np.uint8) + (ref.array > 200)
    assert set(np.unique(mask)) == {0, 1, 2}
    out = write_nifti(mask, ref, tmp_path / "pred.nii.gz", labels={1: "soft", 2: "bone"})
    back = read_nifti(out, labels=True)
    np.testing.assert_array_equal(back.array, mask)
    assert back.meta["dtype"] == "uint8" and back.meta["sform_code"] == 1
    assert same_geometry(back, ref) and back.spacing == pytest.approx(ref.spacing)
    assert load_label_names(tmp_path / "pred.labels.json") == {1: "soft", 2: "bone"}
    write_nifti(np.zeros(ref.shape_zyx, bool), ref, tmp_path / "empty.nii")  # empty is valid
    assert not read_nifti(tmp_path / "empty.nii", labels=True).array.any()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.nii", "pred.labels.json", "pred.nii.gz"
    ]  # fmt: skip


def test_nifti_round_trip_oblique_uint16(tmp_path):
    aff = affine_from_spacing((2.5, 0.8, 0.7), (-101.3, 47.9, 312.4), _rotation(30, 20))
    ref = Volume(np.zeros((5, 7, 9), np.float32), (2.5, 0.8, 0.7), aff, {"source": "synthetic"})
    mask = np.zeros(ref.shape_zyx, np.int64)
    mask[1:4, 2:5, 3:8] = 300  # > 255: stored as uint16
    mask[4, 0, 0] = 1
    back = read_nifti(write_nifti(mask, ref, tmp_path / "obl.nii"), labels=True)
    np.testing.assert_array_equal(back.array, mask)
    assert back.meta["dtype"] == "uint16" and same_geometry(back, ref, atol_mm=1e-3)
    assert back.spacing == pytest.approx(ref.spacing, abs=1e-5)


def test_nifti_errors_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    ref = Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4, 3\) differs .* \(2, 3, 4\)"):
        write_nifti(np.zeros((2, 4, 3)), ref, tmp_path / "a.nii")
    with pytest.raises(ValueError, match="must end in .nii or .nii.gz"):
        write_nifti(np.zeros((2, 3, 4)), ref, tmp_path / "a.nrrd")
    bad = Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), np.diag([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="volume without geometry"):
        write_nifti(np.zeros((2, 3, 4)), bad, tmp_path / "a.nii")
    bad.affine = np.full((4, 4), np.nan)
    with pytest.raises(ValueError, match="volume without geometry"):
        write_nifti(np.zeros((2, 3, 4)), bad, tmp_path / "a.nii")
    with pytest.raises(ValueError, match="negative"):
        write_nifti(-np.ones((2, 3, 4), int), ref, tmp_path / "a.nii")
    assert not list(tmp_path.iterdir())

    old = write_nifti(np.ones((2, 3, 4), bool), ref, tmp_path / "m.nii.gz").read_bytes()

    def half_write(self, io_obj, **kwargs):
        io_obj.write(b"\0" * 200)
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", half_write)
    for name in ("m.nii.gz", "new.nii"):
        with pytest.raises(OSError, match="disk full"):
            write_nifti(np.zeros((2, 3, 4), bool), ref, tmp_path / name, labels={1: "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]  # no temp, sidecar or new.nii
    assert (tmp_path / "m.nii.gz").read_bytes() == old


@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), (0.866025, 0.5, 0, 0, 0.5, -0.866025)])
def test_dicom_seg_round_trip_references_source(tmp_path, iop):
    _ct_series(tmp_path / "ct", [4.0, -2.0, 0.0, 2.0], iop)  # files 000..003 not in z order
    ref = read_dicom_series(tmp_path / "ct")
    assert [Path(f).name for f in ref.meta["files"]] == ["001.dcm", "002.dcm", "003.dcm", "000.dcm"]
    mask = _two_labels(ref.shape_zyx)
    out = write_dicom_seg(mask, tmp_path / "ct", tmp_path / "seg.dcm", labels={1: "liver"})
    liver, seg2 = read_dicom_seg(out, reference=ref)
    assert (liver.label_id, liver.name, seg2.label_id, seg2.name) == (1, "liver", 2, "segment 2")
    np.testing.assert_array_equal(liver.mask, mask == 1)
    np.testing.assert_array_equal(seg2.mask, mask == 2)

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.Manufacturer == "samed2-kit" and ds.SeriesInstanceUID != SERIES_UID
    assert ds.StudyInstanceUID == "1.2.3" and ds.FrameOfReferenceUID == "1.2.4"
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ref.meta["series_uid"] == SERIES_UID
    refd = [str(i.ReferencedSOPInstanceUID) for i in series.ReferencedInstanceSequence]
    assert sorted(refd) == sorted(ref.meta["sop_instance_uids"])
    assert ds.NumberOfFrames == 4  # 2 frames per segment, empty frames omitted
    pos = np.asarray(ref.meta["positions"])
    for item in ds.PerFrameFunctionalGroupsSequence:  # each frame -> the SOP at its position
        ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        z = int(np.argmin(np.linalg.norm(pos - ipp, axis=1)))
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == ref.meta["sop_instance_uids"][z]
        num = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert (mask[z] == num).any()
    code = ds.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0]
    assert (code.CodingSchemeDesignator, code.CodeValue) == ("SCT", "85756007")
    alg = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert alg.AlgorithmName == "samed2-kit"


def test_dicom_seg_from_volume_sparse_labels_and_empty(tmp_path):
    _ct_series(tmp_path / "ct", [0.0, 2.0, 4.0, 6.0])
    ref = read_dicom_series(tmp_path / "ct")
    mask = _two_labels(ref.shape_zyx) * 3 + 1 * (_two_labels(ref.shape_zyx) == 2)  # values 3, 7
    segs = read_dicom_seg(write_dicom_seg(mask, ref, tmp_path / "a.dcm"), ref)  # Volume source
    assert [(s.label_id, s.name) for s in segs] == [(1, "segment 3"), (2, "segment 7")]
    np.testing.assert_array_equal(segs[1].mask, mask == 7)
    empty = np.zeros(ref.shape_zyx, bool)
    with pytest.raises(ValueError, match="all zero and no labels"):
        write_dicom_seg(empty, tmp_path / "ct", tmp_path / "b.dcm")
    (seg,) = read_dicom_seg(write_dicom_seg(empty, ref, tmp_path / "b.dcm", labels={1: "x"}), ref)
    assert seg.name == "x" and not seg.mask.any()


def test_dicom_seg_errors_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    _ct_series(tmp_path / "ct", [0.0, 2.0, 4.0, 6.0])
    ref = read_dicom_series(tmp_path / "ct")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"mask shape \(4, 6, 8\) differs .* \(4, 8, 6\)"):
        write_dicom_seg(np.zeros((4, 6, 8), bool), tmp_path / "ct", out / "s.dcm")
    nifti = read_nifti(CT)
    for src in (nifti, CT):
        with pytest.raises(ValueError, match="needs the source DICOM series: pass the series"):
            write_dicom_seg(np.zeros(nifti.shape_zyx, bool), src, out / "s.dcm")
    mask = _two_labels(ref.shape_zyx)
    old = write_dicom_seg(mask, tmp_path / "ct", out / "s.dcm").read_bytes()

    def half_write(self, filename, **kwargs):
        Path(filename).write_bytes(b"\0" * 200)
        raise OSError("disk full")

    monkeypatch.setattr(highdicom.seg.Segmentation, "save_as", half_write)
    for name in ("s.dcm", "new.dcm"):
        with pytest.raises(OSError, match="disk full"):
            write_dicom_seg(mask, tmp_path / "ct", out / name)
    assert [p.name for p in out.iterdir()] == ["s.dcm"] and (out / "s.dcm").read_bytes() == old


def test_dicom_seg_on_multiframe_source_with_descending_frames(tmp_path):
    _ct_series(tmp_path / "ct", [4.0, -2.0, 0.0, 2.0])
    frames = [pydicom.dcmread(p) for p in sorted((tmp_path / "ct").iterdir())]
    for ds in frames:  # attributes the legacy converter requires
        ds.update(dict(PatientName="Doe^J", PatientBirthDate="", PatientSex="", AccessionNumber=""))
        ds.update(dict(StudyID="1", StudyDate="20240101", StudyTime="120000", SeriesNumber=1))
        ds.update(dict(ReferringPhysicianName="", Manufacturer=""))
    mf = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        frames, generate_uid(), 2, generate_uid(), 1
    )
    mf.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    ipps = [
        f.PlanePositionSequence[0].ImagePositionPatient for f in mf.PerFrameFunctionalGroupsSequence
    ]
    assert [float(p[2]) for p in ipps] == [9.0, 7.0, 5.0, 3.0]  # stored against the z order
    ref = read_dicom_series(tmp_path / "mf.dcm")
    mask = _two_labels(ref.shape_zyx)
    segs = read_dicom_seg(write_dicom_seg(mask, tmp_path / "mf.dcm", tmp_path / "s.dcm"), ref)
    for s in segs:
        np.testing.assert_array_equal(s.mask, mask == s.label_id)


def test_samed2_predict_on_a_dicom_series_writes_a_seg_that_references_it(tmp_path, tiny_model):
    import json

    from samed2_kit.cli import main
    from samed2_kit.model.assemble import save as save_model

    _ct_series(tmp_path / "ct", [0.0, 2.0, 4.0, 6.0])
    run = save_model(tiny_model, tmp_path / "run", {"recipe": {}})
    (tmp_path / "p.json").write_text(json.dumps({"slices": {"1": {"box": [1, 1, 4, 6]}}}))
    out = tmp_path / "seg.dcm"
    assert main(["predict", str(run), str(tmp_path / "ct"), "--prompts", str(tmp_path / "p.json"),
                 "--out", str(out), "--modality", "ct"]) == 0  # fmt: skip
    ref = read_dicom_series(tmp_path / "ct")
    seg = pydicom.dcmread(out)
    assert seg.SeriesDescription and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES_UID
    segments = read_dicom_seg(out, reference=ref)
    assert len(segments) == 1 and segments[0].mask.shape == ref.shape_zyx
