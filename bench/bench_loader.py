"""Benchmark: StoreDataset loader throughput against what one training step consumes.

Writes a synthetic medbank store (volumes of 10 noisy 512x512 slices, ~150 KB PNGs like real CT
slices; label "a" on every slice, "b" on two), then times the DataLoader (augmentation on,
batch 4, workers 0 and 2, clip_len 1 and 3) over ~100 batches after a warm-up, epochs
re-seeded with ``set_epoch``; and one training step of the ``tiny`` SAM 2 model (forward + BCE
on ``low_res_logits`` + backward, no optimizer step; median of 3 after a warm-up). A clip of T
slices is T encoder images, so the ratio compares images/s (= samples/s for clip_len 1).

    .venv/bin/python bench/bench_loader.py [--volumes 20] [--batches 100] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from samed2_kit.medbank._synthetic import SyntheticCase, write_synthetic_store
from samed2_kit.medbank.dataset import StoreDataset, collate_clips, open_store_raw
from samed2_kit.prompts import PromptConfig


def loader_rate(store, size, clip_len, workers, batches, max_s, warmup=5):
    """(samples/s, s to the first batch, batches timed) of a shuffled, augmented DataLoader,
    batch 4: ``batches`` after ``warmup``, or fewer if that takes over ``max_s`` seconds.
    ``workers`` "0/1t": in the main process with 1 torch thread (workers always use 1)."""
    threads = torch.get_num_threads()
    if workers == "0/1t":
        torch.set_num_threads(1)
    try:
        return _loader_rate(
            store,
            size,
            clip_len,
            int(workers[0]) if isinstance(workers, str) else workers,
            batches,
            max_s,
            warmup,
        )
    finally:
        torch.set_num_threads(threads)


def _loader_rate(store, size, clip_len, workers, batches, max_s, warmup):
    ds = StoreDataset(
        store, clip_len=clip_len, image_size=size, augment=True, prompt=PromptConfig("box")
    )
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=True, generator=gen, num_workers=workers,
        collate_fn=collate_clips,
    )  # fmt: skip
    seen, n, epoch, t0 = 0, 0, 0, time.perf_counter()
    first = start = None
    while n < warmup + batches:
        ds.set_epoch(epoch)
        for batch in loader:
            n += 1
            if first is None:
                first = time.perf_counter() - t0
            if n == warmup:
                start = time.perf_counter()
            elif n > warmup:
                seen += len(batch["case_id"])
            if n == warmup + batches or (start and time.perf_counter() - start > max_s):
                batches = n - warmup
                break
        epoch += 1
    return seen / (time.perf_counter() - start), first, batches


def train_step_seconds(size: int, batch: int, repeats: int = 3) -> float:
    """Median seconds of forward + BCE + backward of ``tiny`` at ``size`` px (1 warm-up)."""
    from samed2_kit.model import Prompts, build_model

    torch.manual_seed(0)
    model = build_model("tiny", image_size=size).train()
    images = torch.randn(batch, 3, size, size)
    boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]).repeat(batch, 1) * size
    target = (torch.rand(batch, 1, size // 4, size // 4) > 0.5).float()
    times = []
    for k in range(repeats + 1):
        t = time.perf_counter()
        out = model(images, Prompts(boxes=boxes))
        loss = F.binary_cross_entropy_with_logits(out.low_res_logits[:, :1], target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if k:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_ms(store) -> tuple[float, float]:
    """ms per 512x512 slice: our cv2 path on raw bytes vs datasets' own PIL decode."""
    from datasets import load_from_disk

    from samed2_kit.medbank.dataset import decode_png

    raw, _ = open_store_raw(store)
    pil = load_from_disk(str(store / "images")).select_columns(["image"])
    rows = list(range(min(40, len(raw))))
    t = time.perf_counter()
    for r in rows:
        decode_png(raw[r]["image"], "bench")
    ours = (time.perf_counter() - t) / len(rows) * 1e3
    t = time.perf_counter()
    for r in rows:
        np.asarray(pil[r]["image"])
    return ours, (time.perf_counter() - t) / len(rows) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=20, help="volumes of 10 slices")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="training-step batch")
    ap.add_argument("--max-seconds", type=float, default=20, help="per loader config")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cases = tuple(SyntheticCase(f"v{k:02d}", 10) for k in range(args.volumes))
        store = write_synthetic_store(tmp, cases, hw=(args.size, args.size), noise=12)
        n = len(StoreDataset(store))
        print(f"store: {n} samples, {10 * args.volumes} slices at {args.size}^2 "
              f"(written in {time.perf_counter() - t:.1f} s); torch threads "
              f"{torch.get_num_threads()}")  # fmt: skip
        ours, pil = decode_ms(store)
        print(
            f"PNG decode per slice: {ours:.2f} ms (cv2 on raw bytes), {pil:.2f} ms (datasets/PIL)"
        )
        rows = []
        for clip_len in (1, 3):
            for workers in (0, "0/1t", 2):
                rows.append(
                    (clip_len, workers)
                    + loader_rate(
                        store, args.size, clip_len, workers, args.batches, args.max_seconds
                    )
                )
    step = train_step_seconds(args.size, args.batch)
    need = args.batch / step  # images/s one training step consumes
    print(f"\ntraining step (tiny, {args.size} px, batch {args.batch}, fwd+BCE+bwd): "
          f"{step:.2f} s -> {need:.2f} images/s consumed\n")  # fmt: skip
    print("| loader config | samples/s | images/s | x of what training consumes |")
    print("| --- | --- | --- | --- |")
    for clip_len, workers, rate, first, timed in rows:
        cfg = f"clip_len {clip_len}, workers {workers} ({timed} batches; first after {first:.2f} s)"
        print(f"| {cfg} | {rate:.1f} | {rate * clip_len:.1f} | {rate * clip_len / need:.0f}x |")
    print(f"| training step (tiny, batch {args.batch}) | {need:.2f} | {need:.2f} | 1x |")
    worst = min(r[2] * r[0] for r in rows) / need
    print(f"\nslowest loader config delivers {worst:.0f}x the images a training step consumes")


if __name__ == "__main__":
    main()
