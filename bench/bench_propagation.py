"""Benchmark: volume propagation slices/s, `propagate_volume` against SAM 2's own video path.

Both arms run on the same model object (same weights: random init, seeded; speed only), the same
volume and the same slices, in one process, in eval mode under `torch.no_grad()`:

- SAM 2: what `SAM2VideoPredictor` does per frame, with the frames from memory: the slice mapped
  to the model input, `sam.forward_image` + `sam._prepare_backbone_features` (one frame at a
  time), then `sam.track_step` with an output dict filled frame by frame: the key slice is the
  conditioning frame, prompted with its box as two points labelled 2 and 3; the slices above it
  are tracked one by one (memory bank of `num_maskmem` = 7: the conditioning frame + the 6 most
  recent, plus SAM 2's object pointers); low-res logits upsampled to the slice, > 0.
- ours: `propagate_volume(model, volume, {key: Prompt(box=...)}, direction="up",
  memory_frames=num_maskmem - 1)`: the same slices, memory of the prompted slice + the 6 most
  recent (no object pointers), the encoder batched (`--batch` slices per call).

Each arm's whole pass is timed (median of `--repeats` alternated calls after one warm-up, as
`_common.alternate`), with the share of the image encoder (ours: `model.encode`; SAM 2:
`forward_image` + `_prepare_backbone_features`); "rest" is everything else (intensity mapping and
resizing, memory attention, decoder, memory encoder, upsampling). Sanity check, not a test: Dice
between the two arms' masks on the prompted slice and over the tracked slices, once as built and
once with the object-score head forced to "present" (untimed). The paths differ in detail, so the
numbers need not be 1: SAM 2 empties the prompted frame's mask when its object score is <= 0 (we
keep it, as the Predictor does), decodes unprompted frames with an empty point (label -1; we give
no sparse token) and attends to object pointers.

    .venv/bin/python bench/bench_propagation.py [--models test-tiny:64,tiny:128] [--repeats 3]
        [--case hippocampus_001 | --synthetic 32x96x96] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
HIPPO = REPO / "samed2_kit" / "sample_data" / "msd_hippocampus"


def cpu_line() -> str:
    """The CPU's model name and its AVX-512 / AMX support (Linux /proc/cpuinfo)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    has = [n for n, f in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if f in flags]
    return f"{name}, {os.cpu_count()} cores" + (f" ({', '.join(has)})" if has else "")


def load_volume(args) -> tuple[np.ndarray, np.ndarray, str]:
    """(image (Z, H, W) float32, object mask (Z, H, W) bool, description)."""
    if args.synthetic:
        z, h, w = (int(v) for v in args.synthetic.lower().split("x"))
        rng = np.random.default_rng(0)
        zz, yy, xx = np.meshgrid(np.arange(z), np.arange(h), np.arange(w), indexing="ij")
        radius = (0.15 + 0.1 * np.sin(np.pi * zz / max(z - 1, 1))) * min(h, w)
        obj = (yy - h / 2) ** 2 + (xx - w / 2 - 0.1 * w * zz / z) ** 2 < radius**2
        image = obj * 1.0 + rng.normal(0, 0.3, obj.shape)
        return image.astype(np.float32), obj, f"synthetic tube {z}x{h}x{w}"
    from samed2_kit.medbank.io import read_volume

    image = read_volume(HIPPO / "images" / f"{args.case}.nii.gz").array
    labels = read_volume(HIPPO / "labels" / f"{args.case}.nii.gz", labels=True).array
    z, h, w = image.shape
    return image.astype(np.float32), labels > 0, f"MSD hippocampus {args.case} (MR) {z}x{h}x{w}"


def upsample(low: torch.Tensor, h: int, w: int) -> np.ndarray:
    """(1, 1, S/4, S/4) logits -> (h, w) bool, bilinear then > 0 (what both paths return)."""
    up = F.interpolate(low.float(), size=(h, w), mode="bilinear", align_corners=False)
    return (up[0, 0] > 0).numpy()


@torch.no_grad()
def sam2_video(model, image: np.ndarray, key: int, box: np.ndarray, enc: list) -> np.ndarray:
    """SAM 2's video path from the box on slice `key` up to the last slice -> (Z, H, W) bool;
    appends the seconds spent in the image encoder to `enc`."""
    from samed2_kit.medbank.preprocess import to_model_input
    from samed2_kit.volume import volume_intensity

    sam, s = model.sam, model.image_size
    n, h, w = image.shape
    slice01 = volume_intensity(image, "mr")
    corners = box.reshape(1, 2, 2) * np.array([s / w, s / h])  # slice px -> model-input px
    points = {"point_coords": torch.tensor(corners, dtype=torch.float32),
              "point_labels": torch.tensor([[2, 3]], dtype=torch.int32)}  # fmt: skip
    bank: dict[str, dict] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    out, seconds = np.zeros((n, h, w), dtype=bool), 0.0
    for z in range(key, n):
        x = to_model_input(np.repeat(slice01(z)[..., None], 3, axis=2), s)[None]
        t = time.perf_counter()
        _, feats, pos, sizes = sam._prepare_backbone_features(sam.forward_image(x))
        seconds += time.perf_counter() - t
        cond = z == key
        step = sam.track_step(frame_idx=z, is_init_cond_frame=cond, current_vision_feats=feats,
                              current_vision_pos_embeds=pos, feat_sizes=sizes,
                              point_inputs=points if cond else None, mask_inputs=None,
                              output_dict=bank, num_frames=n)  # fmt: skip
        bank["cond_frame_outputs" if cond else "non_cond_frame_outputs"][z] = step
        out[z] = upsample(step["pred_masks"], h, w)
    enc.append(seconds)
    return out


def ours(model, image, key, box, enc: list, memory_frames: int, batch: int) -> np.ndarray:
    """`propagate_volume` over the same slices; appends its encoder seconds to `enc`."""
    from samed2_kit.prompts import Prompt
    from samed2_kit.volume import propagate_volume

    seconds = [0.0]
    encode = model.encode

    def timed_encode(*a, **k):
        t = time.perf_counter()
        try:
            return encode(*a, **k)
        finally:
            seconds[0] += time.perf_counter() - t

    model.encode = timed_encode  # an instance attribute, removed below
    try:
        out = propagate_volume(model, image, {key: Prompt(box=box)}, modality="mr",
                               direction="up", memory_frames=memory_frames, batch=batch)  # fmt: skip
    finally:
        del model.encode
    enc.append(seconds[0])
    return out


def dice(a: np.ndarray, b: np.ndarray) -> str:
    total = int(a.sum() + b.sum())
    return "both empty" if total == 0 else f"{2 * int((a & b).sum()) / total:.3f}"


def object_forced(model):
    """A copy of `model` whose object-score head always says "present" (+20 on its output bias),
    or None without one: a random-init model has no notion of objectness, so its sign decides
    alone whether SAM 2 (and our propagated slices) keep any mask."""
    sam = model.sam
    if not getattr(sam, "pred_obj_scores", False):
        return None
    probe = copy.deepcopy(model)
    head = probe.sam.sam_mask_decoder.pred_obj_score_head
    with torch.no_grad():
        (head.layers[-1] if hasattr(head, "layers") else head).bias += 20.0
    return probe


def agreement(model, image, key, box, frames: int, batch: int) -> tuple[str, str]:
    """(Dice on the key slice, Dice over the tracked slices) between the two arms' masks."""
    a = sam2_video(model, image, key, box, [])
    b = ours(model, image, key, box, [], frames, batch)
    return dice(b[key], a[key]), dice(b[key:], a[key:])


def bench(variant: str, size: int, image, obj, args) -> dict:
    from _common import alternate

    from samed2_kit.model import build_model
    from samed2_kit.prompts import box_from_mask

    torch.manual_seed(0)
    model = build_model(variant, image_size=size).eval()
    key = int(np.nonzero(obj.any(axis=(1, 2)))[0][0])  # the first slice with the object
    box = box_from_mask(obj[key])
    frames = model.sam.num_maskmem - 1  # SAM 2: the conditioning frame + num_maskmem - 1 recent
    enc: dict[str, list[float]] = {"sam2": [], "ours": []}
    masks: dict[str, np.ndarray] = {}

    def run_sam2():
        masks["sam2"] = sam2_video(model, image, key, box, enc["sam2"])

    def run_ours():
        masks["ours"] = ours(model, image, key, box, enc["ours"], frames, args.batch)

    total = alternate({"sam2": run_sam2, "ours": run_ours}, args.repeats)
    n = image.shape[0] - key
    tracked = slice(key, None)
    probe = object_forced(model)
    row = {"variant": variant, "size": size, "slices": n, "key": key, "frames": frames,
           "dice": (dice(masks["ours"][key], masks["sam2"][key]),
                    dice(masks["ours"][tracked], masks["sam2"][tracked])),
           "forced": None if probe is None else agreement(probe, image, key, box, frames,
                                                          args.batch),
           "fg": {a: masks[a][tracked].mean() for a in masks}}  # fmt: skip
    for arm in ("sam2", "ours"):
        e = statistics.median(enc[arm][1:])  # the timed calls, not the warm-up
        row[arm] = {"s": total[arm], "sps": n / total[arm], "enc_ms": 1000 * e / n,
                    "rest_ms": 1000 * (total[arm] - e) / n}  # fmt: skip
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="test-tiny:64,tiny:128", help="variant:px, comma-separated")
    p.add_argument("--case", default="hippocampus_001", help="a bundled MSD hippocampus case")
    p.add_argument("--synthetic", default=None, help="ZxHxW: a synthetic volume instead")
    p.add_argument("--batch", type=int, default=4, help="slices per encoder call (ours)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    image, obj, what = load_volume(args)
    print(f"{cpu_line()}; {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
          f"random init (seed 0: speed only), load {os.getloadavg()[0]:.2f}")  # fmt: skip
    rows = []
    for item in args.models.split(","):
        variant, size = item.split(":")
        rows.append(bench(variant, int(size), image, obj, args))
    r0 = rows[0]
    print(f"{what}; box on slice {r0['key']} (the first with the object), tracked up to the last "
          f"slice; memory: prompted slice + {r0['frames']} most recent in both arms; median of "
          f"{args.repeats} alternated passes after a warm-up; ms per slice as encoder + rest\n")  # fmt: skip
    print("| model | slices | SAM 2 `track_step` | ms/slice enc + rest | `propagate_volume` | "
          "ms/slice enc + rest | ours / SAM 2 | foreground ours / SAM 2 | "
          "Dice key / volume | the same, objects forced present |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        a, b = r["sam2"], r["ours"]
        print(f"| {r['variant']} {r['size']} px | {r['slices']} | {a['sps']:.1f} slices/s | "
              f"{a['enc_ms']:.1f} + {a['rest_ms']:.1f} | {b['sps']:.1f} slices/s | "
              f"{b['enc_ms']:.1f} + {b['rest_ms']:.1f} | {b['sps'] / a['sps']:.2f}x | "
              f"{100 * r['fg']['ours']:.1f} % / {100 * r['fg']['sam2']:.1f} % | "
              f"{' / '.join(r['dice'])} | {' / '.join(r['forced'] or ('-', '-'))} |")  # fmt: skip
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
