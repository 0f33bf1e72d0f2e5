"""Benchmark: temporal adapters (all blocks) + LoRA against plain SAM 2, same config and inputs.

Per image size: one training step (forward + BCE + backward + AdamW, every parameter trainable,
clips of T slices) and inference forward, median of repeats run alternately in one process; peak
memory (max RSS) of each configuration measured in a fresh subprocess.

    .venv/bin/python bench/bench_adapters.py [--variant tiny] [--clips 2] [--T 2] [--sizes 256,512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F
from _common import alternate


def make(variant: str, size: int, kind: str):
    """kind: plain (all trainable) | adapted (temporal adapters in all blocks + LoRA encoder-attn,
    all trainable) | frozen (adapted, pretrained encoder frozen: only adapters, LoRA, prompt
    encoder and mask decoder train, as a fine-tuning recipe would) | merged (adapted, LoRA merged)."""
    from samed2_kit.adapters.lora import LoraSpec, inject_lora, merge_lora
    from samed2_kit.adapters.temporal import TemporalAdapterConfig, inject_temporal_adapters
    from samed2_kit.model import build_model

    torch.manual_seed(0)
    model = build_model(variant, image_size=size)
    if kind != "plain":
        inject_temporal_adapters(model, TemporalAdapterConfig())
        inject_lora(model, LoraSpec(preset="encoder-attn", rank=8))
        for p in model.parameters():
            p.requires_grad_(True)
        if kind == "merged":
            merge_lora(model)
        if kind == "frozen":
            from samed2_kit.adapters.freeze import FreezePolicy, apply_policy

            keep = ["temporal_adapter", "lora", "prompt_encoder", "mask_decoder"]
            apply_policy(model, FreezePolicy(keep))
    return model


def inputs(size: int, clips: int, t: int):
    from samed2_kit.model import Prompts

    g = torch.Generator().manual_seed(0)
    n = clips * t
    images = torch.randn(n, 3, size, size, generator=g)
    boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]).repeat(n, 1) * size
    target = (torch.rand(n, 1, size // 4, size // 4, generator=g) > 0.5).float()
    return images, Prompts(boxes=boxes), target


def step_fn(model, images, prompts, target, t):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def go():
        out = model(images, prompts, clip_len=t)
        F.binary_cross_entropy_with_logits(out.low_res_logits, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return go


def fwd_fn(model, images, prompts, t):
    def go():
        with torch.no_grad():
            model(images, prompts, clip_len=t)

    return go


def peak_rss_mb(args, size: int, kind: str) -> float:
    """Max RSS (MB) of a fresh process doing 2 training steps of `kind`."""
    cmd = [sys.executable, __file__, "--one", kind, "--variant", args.variant, "--clips",
           str(args.clips), "--T", str(args.T), "--sizes", str(size)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--T", type=int, default=2)
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:  # subprocess mode: peak memory of one configuration
        model = make(args.variant, sizes[0], args.one)
        model.train()
        go = step_fn(model, *inputs(sizes[0], args.clips, args.T), args.T)
        go(), go()
        # VmHWM (not ru_maxrss, which a child inherits from its parent across fork + exec)
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM"))
        print(json.dumps({"peak_mb": int(hwm.split()[1]) / 1024}))
        return
    print(f"variant={args.variant} clips={args.clips} T={args.T} (batch {args.clips * args.T} images) "
          f"repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}\n")  # fmt: skip
    print("| px | train step plain (s) | adapted, all trainable (s) | ratio | adapted, encoder frozen (s) "
          "| ratio | peak MB plain | all trainable | frozen | inference plain (s) | merged (s) | ratio |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in sizes:
        x = inputs(size, args.clips, args.T)
        kinds = ("plain", "adapted", "frozen")
        models = {k: make(args.variant, size, k) for k in (*kinds, "merged")}
        for k in kinds:
            models[k].train()
        st = alternate({k: step_fn(models[k], *x, args.T) for k in kinds}, args.repeats)
        models["plain"].eval(), models["merged"].eval()
        fwd = alternate(
            {k: fwd_fn(models[k], x[0], x[1], args.T) for k in ("plain", "merged")}, args.repeats
        )
        mem = {k: peak_rss_mb(args, size, k) for k in kinds}
        print(
            f"| {size} | {st['plain']:.3f} | {st['adapted']:.3f} | {st['adapted'] / st['plain']:.3f} "
            f"| {st['frozen']:.3f} | {st['frozen'] / st['plain']:.3f} | {mem['plain']:.0f} "
            f"| {mem['adapted']:.0f} ({mem['adapted'] / mem['plain']:.2f}x) "
            f"| {mem['frozen']:.0f} ({mem['frozen'] / mem['plain']:.2f}x) "
            f"| {fwd['plain']:.3f} | {fwd['merged']:.3f} | {fwd['merged'] / fwd['plain']:.3f} |"
        )


if __name__ == "__main__":
    main()
