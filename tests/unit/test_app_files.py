"""samed2_kit.app.files: every input kind opens; bad, unsafe or ambiguous inputs are clear errors."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from samed2_kit.app import files
from samed2_kit.app.files import SeriesChoice, data_entries, open_input, resolve_data
from tests._dicom import write_series

SAMPLES = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data"
HC = SAMPLES / "hc18" / "images" / "000_HC.png"
HIPPO = SAMPLES / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"


def _zip(path: Path, folder: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(folder).as_posix())
    return path


def test_png_jpg_nifti_nrrd_npz_open(tmp_path):
    import cv2
    import nrrd

    o = open_input(HC)
    assert (o.name, o.kind, o.fmt, o.geometry) == ("000_HC", "image", "image", False)
    assert o.volume.array.shape == (1, 540, 800) and o.source == HC
    assert any("no pixel size" in n for n in o.notes)

    jpg = tmp_path / "scan.JPG"
    cv2.imwrite(str(tmp_path / "x.jpg"), np.full((20, 30, 3), 90, np.uint8))
    (tmp_path / "x.jpg").rename(jpg)
    o = open_input(jpg)
    assert (o.name, o.kind, o.fmt) == ("scan", "image", "image")
    assert o.volume.array.shape == (1, 20, 30, 3)

    o = open_input(HIPPO)
    assert (o.name, o.kind, o.fmt, o.geometry, o.notes) == (
        "hippocampus_001", "volume", "nifti", True, []
    )  # fmt: skip

    arr = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)  # nrrd: (x, y, z)
    nrrd.write(str(tmp_path / "v.nrrd"), arr, {"space": "left-posterior-superior",
               "space directions": np.diag([0.5, 0.5, 2.0]), "space origin": [0, 0, 0]})  # fmt: skip
    o = open_input(tmp_path / "v.nrrd")
    assert (o.name, o.kind, o.fmt, o.geometry) == ("v", "volume", "nrrd", True)
    assert o.volume.shape_zyx == (4, 5, 6) and o.volume.spacing == (2.0, 0.5, 0.5)


def test_geometryless_stack_opens_as_slices(tmp_path):
    np.savez(tmp_path / "stack.npz", imgs=np.zeros((3, 8, 8), np.uint8))
    o = open_input(tmp_path / "stack.npz")
    assert (o.kind, o.fmt, o.geometry) == ("volume", "npz", False)
    assert any("no geometry in stack.npz" in n and "stack of 2D slices" in n for n in o.notes)


def test_dicom_folder_file_and_zip(tmp_path):
    write_series(tmp_path / "ct", "1.2.840.99.1", n=4)
    o = open_input(tmp_path / "ct")
    assert (o.name, o.kind, o.fmt, o.geometry) == ("ct", "volume", "dicom", True)
    assert o.volume.shape_zyx == (4, 16, 16) and o.source == tmp_path / "ct"
    assert o.volume.array.min() == -1024 and "1.2.840.99.1" in o.notes[0]

    one = sorted((tmp_path / "ct").iterdir())[0]
    o = open_input(one)
    assert (o.kind, o.fmt, o.volume.shape_zyx) == ("image", "dicom", (1, 16, 16))

    work = tmp_path / "work"
    o = open_input(_zip(tmp_path / "ct.zip", tmp_path / "ct"), workdir=work)
    assert (o.name, o.fmt, o.volume.shape_zyx) == ("ct", "dicom", (4, 16, 16))
    assert o.source.is_relative_to(work) and o.source.is_dir()


def test_two_series_zip_asks_for_a_choice(tmp_path):
    write_series(tmp_path / "study" / "a", "1.2.840.99.1", n=3)
    write_series(tmp_path / "study" / "b", "1.2.840.99.2", n=2)
    z = _zip(tmp_path / "study.zip", tmp_path / "study")
    work = tmp_path / "work"
    with pytest.raises(SeriesChoice) as e:
        open_input(z, workdir=work)
    assert e.value.path == z and "pick one" in str(e.value)
    assert [uid for uid, _ in e.value.series] == ["1.2.840.99.1", "1.2.840.99.2"]
    assert e.value.series[1][1] == "CT '' 2 slices"
    o = open_input(z, series_uid="1.2.840.99.2", workdir=work)
    assert o.volume.shape_zyx == (2, 16, 16) and "of 2 (pick another above)" in o.notes[0]
    assert len(list(work.iterdir())) == 1  # the second open reused the extracted folder
    with pytest.raises(ValueError, match=r"no series '9\.9'.*1\.2\.840\.99\.1, 1\.2\.840\.99\.2"):
        open_input(tmp_path / "study", series_uid="9.9")


def test_zip_slip_symlink_and_limits_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    for member in ("../evil.dcm", "/abs/evil.dcm", "a/../../evil.dcm"):
        z = tmp_path / "slip.zip"
        with zipfile.ZipFile(z, "w") as zf:
            zf.writestr("ok.dcm", b"x")
            zf.writestr(member, b"evil")
        with pytest.raises(ValueError, match=r"^slip\.zip: member .* outside"):
            open_input(z, workdir=work)
    link = zipfile.ZipInfo("link.dcm")
    link.external_attr = 0o120777 << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ValueError, match=r"^link\.zip: member 'link\.dcm' is a symlink"):
        open_input(tmp_path / "link.zip", workdir=work)
    assert not (tmp_path / "evil.dcm").exists() and not Path("/abs/evil.dcm").exists()
    assert not work.exists() or not any(work.rglob("*evil*"))

    write_series(tmp_path / "ct", "1.2.840.99.1", n=3)
    z = _zip(tmp_path / "big.zip", tmp_path / "ct")
    monkeypatch.setattr(files, "MAX_ZIP_FILES", 2)
    with pytest.raises(ValueError, match=r"^big\.zip: 3 files, more than the limit of 2"):
        open_input(z, workdir=work)
    monkeypatch.setattr(files, "MAX_ZIP_FILES", 5000)
    monkeypatch.setattr(files, "MAX_ZIP_MB", 0.001)
    with pytest.raises(ValueError, match=r"^big\.zip: over 0\.001 MB uncompressed"):
        open_input(z, workdir=work)


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("x.png", b"hello, this is text\n" * 5, "cannot open it"),
        ("noise.bin", bytes(range(256)) * 4, "not a file type samed2 reads"),
        ("empty.zip", None, "the zip is empty"),
        ("notes.zip", "zip-text", "no DICOM image series"),
        ("broken.zip", b"PK\x03\x04 not really", "not a readable .zip"),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, name, content, why):
    path = tmp_path / name
    if content is None:
        zipfile.ZipFile(path, "w").close()
    elif content == "zip-text":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("readme.txt", "no images here")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        open_input(path, workdir=tmp_path / "work")
    assert type(e.value) is ValueError and str(e.value).startswith(f"{name}: ")
    assert why in str(e.value) and "samed2 opens PNG/JPEG/TIFF/BMP images" in str(e.value)


def test_truncated_nifti_and_missing_path(tmp_path):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(HIPPO.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"^cut\.nii\.gz: cannot open it .*samed2 opens") as e:
        open_input(cut)
    assert type(e.value) is ValueError and str(tmp_path) not in str(e.value)
    with pytest.raises(ValueError, match=r"^gone\.png: no such file"):
        open_input(tmp_path / "gone.png")


def test_data_entries_and_resolve_data(tmp_path):
    data = tmp_path / "data"
    write_series(data / "patient1" / "ct", "1.2.840.99.1", n=3)
    shutil.copy(HC, data / "us.PNG")
    shutil.copy(HIPPO, data / "patient1" / "h.nii.gz")
    (data / "notes.txt").write_text("x")
    (data / ".hidden").mkdir()
    shutil.copy(HC, data / ".hidden" / "a.png")
    (tmp_path / "secret.png").write_bytes(HC.read_bytes())
    os.symlink(tmp_path / "secret.png", data / "link.png")
    assert data_entries(data) == ["patient1/ct", "patient1/h.nii.gz", "us.PNG"]

    assert resolve_data(data, "patient1/ct") == (data / "patient1" / "ct").resolve()
    assert open_input(resolve_data(data, "patient1/ct")).volume.shape_zyx == (3, 16, 16)
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "patient1/../../secret.png"):
        with pytest.raises(ValueError, match="outside --data"):
            resolve_data(data, bad)
    with pytest.raises(ValueError, match="outside --data"):
        resolve_data(data, "link.png")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_data(data, "nope.png")
