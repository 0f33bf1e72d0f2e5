"""Benchmark: one sequence-training step against the same slices trained as independent images.

Both arms run forward + backward + AdamW on the same model (same init) and the same slices: B runs
of N consecutive slices of the bundled hippocampus volumes. The sequence step prompts the centre
slice and propagates to the others through SAM 2's memory path (`volume.sequence_forward`); the
image step decodes each of the B*N slices on its own, with its run's box (`engine.steps.image_step`;
the cost does not depend on which box). A third arm adds simulated corrective clicks to the
sequence step (`train.clicks`, every run corrected, `--rounds` passes on its prompted slice). The
table gives the median ms per step (calls alternated), slices/s, the ratio, and the process's peak
resident memory (Linux ru_maxrss, after each arm's runs).

    .venv/bin/python bench/bench_sequence.py [--size 64] [--runs 4] [--length 8] [--repeats 10]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    from _common import alternate

    from samed2_kit.config import load_recipe
    from samed2_kit.engine.data import store_dataset
    from samed2_kit.engine.steps import STEPS
    from samed2_kit.losses import SegLoss
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.dataset import collate_clips
    from samed2_kit.medbank.spec import load_spec
    from samed2_kit.model.assemble import from_recipe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="test-tiny")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=4, help="B runs per step")
    p.add_argument("--length", type=int, default=8, help="N slices per run")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="corrective rounds of the clicks arm")
    args = p.parse_args()
    store = Path(tempfile.mkdtemp()) / "store"
    spec, sha = load_spec(REPO / "recipes" / "medbank_hippocampus.yaml")
    spec.clip_radius = max(spec.clip_radius, args.length // 2)  # runs of N need R >= N // 2
    build(spec, store, sha, progress=False)
    base = [f"model.variant={args.variant}", f"model.image_size={args.size}",
            f"data.sequence_len={args.length}", "data.augment=false", "train.mixed_precision=no"]  # fmt: skip
    seq_recipe = load_recipe(None, [*base, "train.step=sequence"])
    img_recipe = load_recipe(None, [*base, "train.step=image"])
    batch = collate_clips(
        [store_dataset(seq_recipe, str(store), None, 0)[i] for i in range(args.runs)]
    )
    flat = {**batch, "clip_len": 1}  # the same slices as B*N independent images
    model = from_recipe(seq_recipe).train()
    clicks_recipe = load_recipe(None, [*base, "train.step=sequence", "train.clicks.prob=1",
                                       f"train.clicks.rounds={args.rounds}"])  # fmt: skip
    arms = {}
    for name, recipe, data in (("sequence", seq_recipe, batch), ("images", img_recipe, flat),
                               (f"sequence+{args.rounds} clicks", clicks_recipe, batch)):  # fmt: skip
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        loss_fn, step = SegLoss(recipe.loss), STEPS[recipe.train.step]

        def run(m=m, opt=opt, step=step, recipe=recipe, data=data, loss_fn=loss_fn):
            res = step(m, data, recipe, loss_fn)
            res.loss.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        arms[name] = run
    seconds = alternate(arms, args.repeats)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = args.runs * args.length
    print(f"{args.variant} at {args.size} px, {args.runs} runs x {args.length} slices = {n} slices "
          f"per step, fp32, {torch.get_num_threads()} threads")  # fmt: skip
    print("| arm | ms / step | slices / s | ratio to images |")
    print("| --- | --- | --- | --- |")
    for name, s in seconds.items():
        print(f"| {name} | {1000 * s:.0f} | {n / s:.0f} | {s / seconds['images']:.2f}x |")
    print(f"peak resident memory of the process: {rss:.0f} MB")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
