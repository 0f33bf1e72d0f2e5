"""Prediction speed on CPU: prompt -> mask latency after `set_image`, and volume propagation
slices/s, each against SAM 2's own modules called directly in the same run (same weights).

- latency: `Predictor.predict(box=...)` (prompt encoder, mask decoder, upsampling to the image,
  numpy) after `set_image`, against sam2's prompt encoder + mask decoder on the same cached
  features; median of `--repeats` calls.
- propagation: `propagate_volume` from a box on the first slice through the whole volume (the
  bundled brain MR, 25 slices, resized to the model), against SAM 2's video path
  (`SAM2Base.track_step` slice after slice, its memory bank and object pointers), both including
  the image encoder; slices/s.

    .venv/bin/python bench/bench_predict.py [--variant tiny] [--sizes 512,1024] [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BRAIN = REPO / "samed2_kit" / "sample_data" / "pyradiomics_brain" / "brain1_image.nrrd"


def _ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def sam2_decoder(model, feats, box: np.ndarray, hw: tuple[int, int], upsample: bool = False):
    """A call of SAM 2's own prompt encoder + mask decoder (single mask) on cached features
    `feats` (ImageFeatures) for `box` (4,) in pixels of an (H, W) = `hw` image; with `upsample`,
    the low-res logits are also upsampled to (H, W) and thresholded, as the Predictor does."""
    from samed2_kit.model import _sam2

    s = model.image_size
    h, w = hw
    mbox = torch.tensor(box * np.array([s / w, s / h, s / w, s / h]), dtype=torch.float32)[None]

    @torch.no_grad()
    def direct():
        sparse, dense = _sam2.embed_prompts(model.sam, None, None, mbox, None, 1)
        sam = model.sam
        low = sam.sam_mask_decoder(
            image_embeddings=feats.image_embed, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=False, repeat_image=False, high_res_features=feats.high_res,
        )[0]  # fmt: skip
        if upsample:
            up = torch.nn.functional.interpolate(low, hw, mode="bilinear", align_corners=False)
            return (up > 0).numpy()
        return low

    return direct


def latency(model, image: np.ndarray, box: np.ndarray, repeats: int) -> dict:
    from samed2_kit.model.predictor import Predictor

    pred = Predictor(model)
    t = time.perf_counter()
    pred.set_image(image, modality="mr")
    set_ms = 1000 * (time.perf_counter() - t)
    direct = sam2_decoder(model, pred._features, box, image.shape)
    return {"set_image_ms": set_ms, "plain_ms": _ms(direct, repeats),
            "ours_ms": _ms(lambda: pred.predict(box=box, multimask_output=False), repeats)}  # fmt: skip


@torch.no_grad()
def sam2_video(model, slices01: list[np.ndarray], box: np.ndarray) -> float:
    """Seconds for SAM 2's own video path over the slices: box on slice 0, then track_step."""
    from samed2_kit.medbank.preprocess import to_model_input

    sam, s = model.sam, model.image_size
    h, w = slices01[0].shape
    out = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    coords = torch.tensor(box * np.array([s / w, s / h, s / w, s / h]), dtype=torch.float32)
    points = {"point_coords": coords.reshape(1, 2, 2), "point_labels": torch.tensor([[2, 3]])}
    t = time.perf_counter()
    for z, sl in enumerate(slices01):
        x = to_model_input(np.repeat(sl[..., None], 3, axis=2), s)[None]
        _, feats, pos, sizes = sam._prepare_backbone_features(sam.forward_image(x))
        step = sam.track_step(z, z == 0, feats, pos, sizes, points if z == 0 else None, None,
                              out, len(slices01))  # fmt: skip
        out["cond_frame_outputs" if z == 0 else "non_cond_frame_outputs"][z] = step
    return time.perf_counter() - t


def propagation(model, volume, box: np.ndarray) -> dict:
    from samed2_kit.volume import propagate_volume
    from samed2_kit.volume.propagate import volume_intensity

    z = volume.shape_zyx[0]
    slice01 = volume_intensity(volume.array, "mr", None)
    slices = [slice01(i) for i in range(z)]
    plain = sam2_video(model, slices, box)
    t = time.perf_counter()
    propagate_volume(model, volume, {0: {"box": box}}, modality="mr", direction="up")
    ours = time.perf_counter() - t
    return {"slices": z, "plain_sps": z / plain, "ours_sps": z / ours}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    from samed2_kit.medbank.io import read_volume
    from samed2_kit.model import build_model

    volume = read_volume(BRAIN)
    image = volume.array[volume.shape_zyx[0] // 2]
    box = np.array([80.0, 70.0, 180.0, 170.0])
    print(f"{args.variant}, random init (speed only), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.2f}; volume {BRAIN.name} "
          f"{volume.shape_zyx}")  # fmt: skip
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        torch.manual_seed(0)
        model = build_model(args.variant, image_size=size).eval()
        rows.append(
            (size, latency(model, image, box, args.repeats), propagation(model, volume, box))
        )
    print(
        "\n| px | set_image | plain SAM 2 decode | Predictor.predict | x plain | "
        "SAM 2 video (track_step) | propagate_volume | x plain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, lat, prop in rows:
        print(f"| {size} | {lat['set_image_ms']:.0f} ms | {lat['plain_ms']:.1f} ms | "
              f"{lat['ours_ms']:.1f} ms | {lat['ours_ms'] / lat['plain_ms']:.2f} | "
              f"{prop['plain_sps']:.2f} slices/s | {prop['ours_sps']:.2f} slices/s | "
              f"{prop['ours_sps'] / prop['plain_sps']:.2f} |")  # fmt: skip
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
