"""Run a `samed2 export` folder with onnxruntime and numpy only (torch is never imported).

    # a 2D image: a box (x0 y0 x1 y1 in pixels) -> a mask PNG (0 / 255)
    python docs/examples/onnx_numpy.py runs/quickstart-onnx image.png --box 180 90 620 450 \\
        --out mask.png
    # a volume: a box on one slice (default: the middle one), propagated through the volume
    python docs/examples/onnx_numpy.py runs/quickstart-onnx scan.nii.gz --box 10 12 30 40 \\
        --slice 14 --modality mr --out mask.nii.gz

What it uses, none of which imports torch:

- `samed2_kit.deploy.runtime`: `OnnxModel` (image_encoder.onnx, prompt_decoder.onnx; checks the
  manifest and the files' digests), `model_input` (resize + ImageNet normalisation as
  manifest["preprocessing"] says) and `upsample_logits` (low-res logits -> the image size);
- `samed2_kit.deploy.propagation`: `OnnxPropagation.propagate_slices` (memory_encoder.onnx,
  memory_attention.onnx: the box's slice, then the slices above and below it, each attending to
  the prompted slice and the 6 most recent results, as `propagate_volume` does);
- `samed2_kit.medbank.preprocess` (intensities to [0, 1]: CT window, MR percentiles, 2D rules) and
  `samed2_kit.medbank.io` / `samed2_kit.export` (reading and writing NIfTI with its affine),
  numpy, nibabel and PIL.

Box coordinates are in pixels of the image, or of the slice (x along the array's last axis, y
along the one before). `--check-no-torch` exits with status 3 when torch was imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def read_image(path: Path) -> np.ndarray:
    """A 2D image as (H, W) or (H, W, 3) (alpha dropped)."""
    from PIL import Image

    a = np.asarray(Image.open(path))
    return a[..., :3] if a.ndim == 3 and a.shape[2] == 4 else a


def to_model_box(box, height: int, width: int, size: int) -> np.ndarray:
    """(x0, y0, x1, y1) in pixels of an (height, width) image -> model-input pixels (0..size)."""
    return np.asarray(box, np.float32) * np.array([size / width, size / height] * 2, np.float32)


def segment_image(export_dir: Path, path: Path, box, out: Path, modality: str, window) -> None:
    """A box on a 2D image -> a mask PNG (0 / 255) of the image's size."""
    from PIL import Image

    from samed2_kit.deploy.runtime import OnnxModel, model_input, upsample_logits
    from samed2_kit.medbank.preprocess import normalize_intensity

    model = OnnxModel(export_dir)
    image = read_image(path)
    h, w = image.shape[:2]
    x = model_input(normalize_intensity(image, modality, window), model.manifest["preprocessing"])
    features = model.encode(x)
    low, iou, _ = model.predict_low_res(features, box=to_model_box(box, h, w, model.image_size),
                                        multimask_output=False)  # fmt: skip
    mask = upsample_logits(low[0], h, w) > 0
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    print(f"{path.name}: {int(mask.sum())} mask pixels of {h} x {w} (predicted IoU "
          f"{float(iou[0]):.2f}) -> {out}")  # fmt: skip


def segment_volume(export_dir: Path, path: Path, box, out: Path, modality: str, window,
                   start: int | None) -> None:  # fmt: skip
    """A box on slice `start` of a volume, propagated both ways -> a NIfTI mask on the volume's
    grid (its affine)."""
    from samed2_kit.deploy.propagation import OnnxPropagation
    from samed2_kit.deploy.runtime import model_input, upsample_logits
    from samed2_kit.export import write_nifti
    from samed2_kit.medbank.io import read_volume
    from samed2_kit.medbank.preprocess import check_intensities, intensity_map

    volume = read_volume(path)
    array = check_intensities(volume.array, "volume")
    if array.ndim != 3:
        raise SystemExit(f"{path}: expected a (Z, Y, X) grey volume, got shape {array.shape}")
    z, h, w = array.shape
    start = z // 2 if start is None else start
    to01 = intensity_map(array, modality, window)  # statistics over the whole volume
    runner = OnnxPropagation(export_dir)
    pre = runner.image_path.model.manifest["preprocessing"]
    logits = runner.propagate_slices(lambda i: model_input(to01(array[i]), pre), z, start,
                                     box=to_model_box(box, h, w, runner.image_size))  # fmt: skip
    mask = upsample_logits(logits, h, w) > 0  # (Z, Y, X)
    write_nifti(mask, volume, out)
    print(f"{path.name}: box on slice {start}, {int(mask.any((1, 2)).sum())} of {z} slices hold "
          f"the object, {int(mask.sum())} voxels -> {out}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("export_dir", type=Path, help="a folder written by `samed2 export`")
    p.add_argument("input", type=Path, help="a 2D image (.png, .jpg) or a volume (.nii, .nii.gz)")
    p.add_argument("--box", nargs=4, type=float, required=True, metavar=("X0", "Y0", "X1", "Y1"))
    p.add_argument(
        "--out", type=Path, required=True, help=".png for an image, .nii.gz for a volume"
    )
    p.add_argument("--slice", type=int, help="the slice the box is on (default: the middle one)")
    p.add_argument("--modality", default="auto", help="auto, ct, mr or 2d (intensity handling)")
    p.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"), help="CT window")
    p.add_argument("--check-no-torch", action="store_true", help="exit 3 if torch was imported")
    args = p.parse_args(argv)
    window = tuple(args.window) if args.window else None
    if args.input.name.lower().endswith((".nii", ".nii.gz")):
        segment_volume(args.export_dir, args.input, args.box, args.out, args.modality, window,
                       args.slice)  # fmt: skip
    else:
        segment_image(args.export_dir, args.input, args.box, args.out, args.modality, window)
    if args.check_no_torch and "torch" in sys.modules:
        print("torch was imported", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
