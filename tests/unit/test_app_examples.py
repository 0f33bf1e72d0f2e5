"""samed2_kit.app.examples: saved examples build into a medbank store with the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from samed2_kit.app import examples
from samed2_kit.app.examples import ExampleSpec, read_example_spec, save_example
from samed2_kit.app.files import open_input
from samed2_kit.medbank.io import read_volume

SAMPLES = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data"
HC = SAMPLES / "hc18" / "images" / "000_HC.png"
HC_MASK = SAMPLES / "hc18" / "masks" / "000_HC_Annotation.png"
HIPPO = SAMPLES / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
HIPPO_LABEL = SAMPLES / "msd_hippocampus" / "labels" / "hippocampus_001.nii.gz"
SPEC = ExampleSpec("us", "fetal_head", "CC-BY-4.0")


def _mask(path: Path) -> np.ndarray:
    return read_volume(path, labels=True).array > 0


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _build(spec: Path, out: Path) -> dict:
    from samed2_kit.cli import main

    assert main(["medbank", "build", str(spec), "--out", str(out)]) == 0
    return json.loads((out / "manifest.json").read_text())


def test_saved_image_and_volume_build_into_a_store(tmp_path):
    folder = tmp_path / "my examples"
    hc, hippo = open_input(HC), open_input(HIPPO)
    mask_2d = save_example(folder, hc, _mask(HC_MASK), SPEC)
    assert mask_2d == folder / "masks" / "000_HC.png"
    label = _mask(HIPPO_LABEL)
    assert save_example(folder, hippo, label, SPEC) == (
        folder / "volumes" / "hippocampus_001_label.nii.gz"
    )
    saved = read_volume(folder / "volumes" / "hippocampus_001_image.nii.gz")
    assert np.allclose(saved.affine, hippo.volume.affine, atol=1e-4)
    assert np.array_equal(saved.array, hippo.volume.array)
    assert np.array_equal(read_volume(mask_2d).array[0] > 0, _mask(HC_MASK)[0])
    assert np.array_equal(read_volume(folder / "images" / "000_HC.png").array, hc.volume.array)
    assert read_example_spec(folder) == SPEC

    again = save_example(folder, hc, _mask(HC_MASK), SPEC)  # a second save: a new id
    assert again == folder / "masks" / "000_HC__2.png"
    z = int(label.sum(axis=(1, 2)).argmax())  # a slice of the volume, pixel size known (mm)
    assert save_example(folder, hippo, label, SPEC, slice_index=z) == (
        folder / "masks_mm" / "hippocampus_001__2.png"
    )
    assert (folder / "pixel_size.csv").read_text().splitlines()[1] == "hippocampus_001__2.png,1.0"

    manifest = _build(folder / "spec.yaml", tmp_path / "store")
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert set(by_name) == {"my_examples_2d", "my_examples_2d_mm", "my_examples_3d"}
    assert by_name["my_examples_2d"]["samples"] == 2
    assert by_name["my_examples_2d_mm"]["samples"] == 1
    assert by_name["my_examples_3d"]["samples"] == int((label.sum(axis=(1, 2)) > 0).sum())
    assert all((s["modality"], s["task"]) == ("us", "fetal_head") for s in manifest["sources"])
    from samed2_kit.medbank.store import info_table

    # repeats of one input (and a slice of a saved volume) share a case, so a split: 2, not 4
    n3d = by_name["my_examples_3d"]["samples"]
    assert f"{n3d + 3} samples, 2 cases" in info_table(tmp_path / "store")


def test_mismatch_empty_and_geometryless_refused(tmp_path):
    folder = tmp_path / "ex"
    hc = open_input(HC)
    save_example(folder, hc, _mask(HC_MASK), SPEC)
    before = _files(folder)
    with pytest.raises(
        ValueError, match=r"modality 'us', task 'fetal_head'.*choose another folder"
    ):
        save_example(folder, hc, _mask(HC_MASK), ExampleSpec("ct", "fetal_head", "CC-BY-4.0"))
    with pytest.raises(ValueError, match="the mask is empty: segment the object before saving"):
        save_example(folder, hc, np.zeros((1, 540, 800), bool), SPEC)
    with pytest.raises(ValueError, match=r"mask shape \(1, 10, 10\) differs"):
        save_example(folder, hc, np.ones((1, 10, 10), bool), SPEC)
    np.savez(tmp_path / "stack.npz", imgs=np.zeros((3, 8, 8), np.uint8))
    stack = open_input(tmp_path / "stack.npz")
    with pytest.raises(ValueError, match=r"no geometry.*slice_index=z"):
        save_example(folder, stack, np.ones((3, 8, 8), bool), SPEC)
    assert _files(folder) == before
    with pytest.raises(ValueError, match="modality 'scan'"):
        ExampleSpec("scan", "t", "x")
    with pytest.raises(ValueError, match="task 'a b'"):
        ExampleSpec("us", "a b", "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match=r"busy holds files .* but no spec\.yaml"):
        save_example(tmp_path / "busy", hc, _mask(HC_MASK), SPEC)


def test_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    folder = tmp_path / "ex"
    hc, hippo = open_input(HC), open_input(HIPPO)
    save_example(folder, hc, _mask(HC_MASK), SPEC)
    before = _files(folder)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("samed2_kit.export.write_nifti", broken)  # the label of a volume fails
    with pytest.raises(OSError, match="disk full"):
        save_example(folder, hippo, _mask(HIPPO_LABEL), SPEC)
    assert _files(folder) == before and not (folder / "volumes").exists()
    monkeypatch.undo()
    monkeypatch.setattr(examples, "_write_spec", broken)  # the spec (written last) fails
    with pytest.raises(OSError, match="disk full"):
        save_example(folder, hippo, _mask(HIPPO_LABEL), SPEC, slice_index=10)
    assert _files(folder) == before and not (folder / "images_mm").exists()
