"""Benchmark: medbank build throughput (slices/s) from NIfTI volumes and from a DICOM series.

Synthetic CT (512 x 512 slices, a 10-label map), written once to a temporary folder, then built
into a store with the default CT window; the table reports input slices per second. The NIfTI set
is built once per `--num-proc` value (worker processes; the store's content hash is checked to be
the same for every value); the DICOM set is one series, one case, so it is built by one process.

    .venv/bin/python bench/bench_build.py [--slices 64] [--volumes 4] [--num-proc 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _volume(z: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Z, 512, 512) HU with ten blobs; labels 1..10 on them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:512, :512]
    img = rng.normal(-50, 60, (z, 512, 512)).astype(np.float32)
    lab = np.zeros((z, 512, 512), np.uint8)
    for k in range(1, 11):
        cy, cx, r = rng.integers(80, 430, 2).tolist() + [int(rng.integers(15, 60))]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        z0 = int(rng.integers(0, z // 2))
        lab[z0 : z0 + z // 2][:, disk] = k
        img[z0 : z0 + z // 2][:, disk] += 40 * k
    return img, lab


def write_nifti(
    folder: Path, key: str, img: np.ndarray, lab: np.ndarray, sign: float = 1.0
) -> None:
    """sign=-1: x and y run right-to-left / anterior-to-posterior (the grid of an axial DICOM
    series with identity orientation, whose LPS axes are -x, -y in RAS)."""
    import nibabel as nib

    aff = np.diag([0.8 * sign, 0.8 * sign, 2.5, 1.0])
    nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), aff), str(folder / f"{key}_img.nii.gz"))
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), aff), str(folder / f"{key}_lab.nii.gz"))


def write_dicom(folder: Path, img: np.ndarray) -> None:
    """An uncompressed CT series (int16 + rescale intercept -1024), one file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, frame = generate_uid(), generate_uid()
    for k, sl in enumerate(img):
        ds = Dataset()
        ds.update(dict(
            SOPClassUID=CTImageStorage, SOPInstanceUID=generate_uid(), Modality="CT",
            SeriesInstanceUID=series, StudyInstanceUID="1.2.3", FrameOfReferenceUID=frame,
            InstanceNumber=k + 1, ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            ImagePositionPatient=[0, 0, 2.5 * k], PixelSpacing=[0.8, 0.8], Rows=512, Columns=512,
            SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", BitsAllocated=16,
            BitsStored=16, HighBit=15, PixelRepresentation=1, RescaleSlope=1, RescaleIntercept=-1024,
            PixelData=(np.clip(sl, -1024, 3000) + 1024).astype(np.int16).tobytes(),
        ))  # fmt: skip
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def timed_build(spec_text: str, folder: Path, num_proc: int = 1) -> tuple[float, int, int, str]:
    """(seconds, images stored, samples stored, content hash) of one build into folder/store."""
    import json

    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec

    (folder / "spec.yaml").write_text(spec_text)
    spec, sha = load_spec(folder / "spec.yaml")
    t = time.perf_counter()
    report = build(spec, folder / "store", sha, progress=False, num_proc=num_proc)
    secs = time.perf_counter() - t
    content = json.loads((folder / "store" / "manifest.json").read_text())["content_sha256"]
    return secs, report.images, report.samples, json.dumps(content, sort_keys=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1], help="worker processes")
    args = ap.parse_args()
    import datasets  # noqa: F401  (imported before timing, so the first build is not charged)

    import samed2_kit.medbank.cases  # noqa: F401

    head = "split: {train: 0.75, test: 0.25}\nsources:\n"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "nii").mkdir()
        for v in range(args.volumes):
            write_nifti(tmp / "nii", f"ct{v}", *_volume(args.slices, v))
        hashes = set()
        for num_proc in args.num_proc:
            secs, n_img, n_s, content = timed_build(
                head + "  - {name: nii, layout: volumes, root: ., image: '{id}_img.nii.gz', "
                "mask: '{id}_lab.nii.gz', modality: ct, task: blobs, licence: CC0}\n",
                tmp / "nii",
                num_proc,
            )
            hashes.add(content)
            rows.append(("NIfTI", num_proc, args.volumes * args.slices, secs, n_img, n_s))
        if len(hashes) != 1:
            raise SystemExit(f"the store differs between --num-proc values: {hashes}")
        img, lab = _volume(args.slices, 99)
        write_dicom(tmp / "dcm" / "ct", img)
        write_nifti(tmp / "dcm", "ct", img, lab, sign=-1.0)  # labels on the series' grid
        (tmp / "dcm" / "ct_img.nii.gz").unlink()
        secs, n_img, n_s, _ = timed_build(
            head.replace("0.75, test: 0.25", "1.0") + "  - {name: dcm, layout: dicom, root: .,"
            " items: [{id: ct, image: ct, mask: ct_lab.nii.gz}], modality: ct, task: blobs,"
            " licence: CC0}\n", tmp / "dcm",
        )  # fmt: skip
        rows.append(("DICOM series", 1, args.slices, secs, n_img, n_s))
    print("| input | processes | slices in | seconds | slices/s | images stored | samples stored |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, procs, n, secs, n_img, n_s in rows:
        print(f"| {name} | {procs} | {n} | {secs:.1f} | {n / secs:.1f} | {n_img} | {n_s} |")


if __name__ == "__main__":
    main()
