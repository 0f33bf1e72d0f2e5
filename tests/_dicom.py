"""A synthetic CT series for tests: `n` axial slices 2 mm apart, written one file per slice."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_series(folder: Path, uid: str, n: int = 3, size: int = 16, value: int | None = None):
    """`n` size x size CT slices (int16, rescale intercept -1024) of series `uid` into `folder`
    (files named by the uid's last 3 characters). Pixels: `value` HU everywhere, or (None) -1024
    HU with a 300-unit square at rows/cols 4..11."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    if value is None:
        pixels = np.zeros((size, size), np.int16)
        pixels[4:12, 4:12] = 300
    else:
        pixels = np.full((size, size), value + 1024, np.int16)
    for k in range(n):
        ds = Dataset()
        ds.update(dict(
            SOPClassUID=CTImageStorage, SOPInstanceUID=generate_uid(), Modality="CT",
            SeriesInstanceUID=uid, StudyInstanceUID="1.2.3", FrameOfReferenceUID="1.2.4",
            PatientID="p1", InstanceNumber=k + 1, ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
            ImagePositionPatient=[0.0, 0.0, 2.0 * k], PixelSpacing=[1.0, 1.0], SliceThickness=2,
            Rows=size, Columns=size, SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2",
            BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=1, RescaleSlope=1,
            RescaleIntercept=-1024, PixelData=pixels.tobytes(),
        ))  # fmt: skip
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{uid[-3:]}_{k:03d}.dcm", enforce_file_format=True)
