"""Benchmark: SAMed2Model against the same sam2 modules called directly.

The direct calls are `tests/_reference.py`'s `direct_sam2` (the forward `tests/unit/test_wrapper.py`
checks the wrapper against), imported as `tests._reference` with the repository root put on
`sys.path` below. Same weights, same inputs, same process; forward (inference, no grad) and a full training step
(forward + loss + backward + AdamW step), median over repeats, at 256 and 512 px.

    .venv/bin/python bench/bench_wrapper.py [--variant tiny] [--batch 2] [--repeats 5] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate

from samed2_kit.model import Prompts, build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests._reference: the plain SAM 2 forward


def run(variant: str, size: int, batch: int, repeats: int, bf16: bool) -> dict:
    from tests._reference import direct_sam2

    torch.manual_seed(0)
    model = build_model(variant, image_size=size)
    sam = model.sam
    images = torch.randn(batch, 3, size, size)
    boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]).repeat(batch, 1) * size
    target = (torch.rand(batch, 1, size // 4, size // 4) > 0.5).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def fwd_ours():
        with torch.no_grad(), amp:
            model(images, Prompts(boxes=boxes))

    def fwd_direct():
        with torch.no_grad(), amp:
            direct_sam2(sam, images, boxes)

    def step(forward):
        def go():
            with amp:
                logits = forward()
            loss = F.binary_cross_entropy_with_logits(logits.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return go

    model.eval()
    res = alternate({"fwd_direct": fwd_direct, "fwd_ours": fwd_ours}, repeats)
    model.train()
    step_direct = step(lambda: direct_sam2(sam, images, boxes)[0])
    step_ours = step(lambda: model(images, Prompts(boxes=boxes)).low_res_logits)
    res |= alternate({"step_direct": step_direct, "step_ours": step_ours}, repeats)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--sizes", default="256,512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU)")
    args = ap.parse_args()
    print(
        f"variant={args.variant} batch={args.batch} repeats={args.repeats} bf16={args.bf16} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}\n"
    )
    print(
        "| px | forward sam2 (s) | forward ours (s) | ratio | train step sam2 (s) | train step ours (s) | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        r = run(args.variant, size, args.batch, args.repeats, args.bf16)
        print(
            f"| {size} | {r['fwd_direct']:.3f} | {r['fwd_ours']:.3f} | "
            f"{r['fwd_ours'] / r['fwd_direct']:.3f} | {r['step_direct']:.3f} | "
            f"{r['step_ours']:.3f} | {r['step_ours'] / r['step_direct']:.3f} |"
        )


if __name__ == "__main__":
    main()
