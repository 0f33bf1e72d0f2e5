"""Benchmark: the training engine (1 and 2 processes) against a plain SAM 2 training loop.

All arms train the same model from the same init on the same medbank store (the bundled samples'
HC18 task), box prompts, fp32, and report optimizer steps/s and images/s (median step time after
2 warm-up steps):

- plain SAM 2: sam2's modules called directly (tests/_reference.py's direct_sam2), Dice+BCE loss, AdamW,
  batches from the same DataLoader; no Accelerate, no logging, no checkpoints;
- engine, 1 process: `samed2_kit.engine.train.train` (Accelerate, global-batch sampler, SegLoss,
  step log, checkpoint every `--save-every` steps);
- engine, 2 CPU processes (gloo DDP) through `accelerate launch`, per-process batch halved, so the
  global batch is the same.

    .venv/bin/python bench/bench_train.py [--variant test-tiny] [--size 256] [--batch 4] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests._reference: the plain SAM 2 forward


def recipe_for(args, batch: int, out: str | None):
    from samed2_kit.config import load_recipe

    return load_recipe(
        None,
        [f"model.variant={args.variant}", f"model.image_size={args.size}",
         f"train.batch_size={batch}", f"train.steps={args.steps}", "train.warmup_steps=2",
         "train.mixed_precision=no", "data.tasks=[fetal_head]", "train.tensorboard=false",
         f"train.save_every={args.save_every if out else 0}"],
    )  # fmt: skip


def step_times(history, global_batch: int) -> float:
    """Median seconds per optimizer step after 2 warm-up steps, from the per-step samples/s."""
    return statistics.median(global_batch / h.samples_per_s for h in history[2:])


def engine_worker(args) -> None:
    """One process of the engine arm (also run under accelerate launch): prints a JSON line."""
    from samed2_kit.engine.train import train
    from samed2_kit.model import build_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = args.batch // world
    torch.manual_seed(0)
    model = build_model(args.variant, image_size=args.size)
    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_for(args, batch, out)
        _, result, accel = train(recipe, model, args.store, out, progress=False)
        if accel.is_main_process:
            print("RESULT " + json.dumps({"step_s": step_times(result.history, args.batch)}))
        accel.end_training()


def plain_sam2(args) -> float:
    """Median seconds per step of a hand-written loop over sam2's modules."""
    import torch.nn.functional as F

    from samed2_kit.engine.data import EpochIndexed, make_loader, store_dataset
    from samed2_kit.model import build_model
    from tests._reference import direct_sam2

    recipe = recipe_for(args, args.batch, None)
    torch.manual_seed(0)
    sam = build_model(args.variant, image_size=args.size).sam.train()
    loader = make_loader(EpochIndexed([store_dataset(recipe, args.store, ["fetal_head"], 0)]),
                         recipe, 0, 1, 0)  # fmt: skip
    opt = torch.optim.AdamW([p for p in sam.parameters() if p.requires_grad], lr=3e-4)
    times, batches = [], iter(loader)
    for _ in range(args.steps):
        t = time.perf_counter()  # data loading included, as in the engine's step time
        batch = next(batches)
        images, target = batch["image"], batch["mask"]  # (B, 3, S, S), (B, 1, S, S)
        masks = direct_sam2(sam, images, batch["box"])[0]
        target = F.interpolate(target, size=masks.shape[-2:], mode="nearest")
        prob = masks.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2, 3)) + 1) / (
            prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1
        )
        loss = dice.mean() + F.binary_cross_entropy_with_logits(masks, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def build_store() -> str:
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec

    folder = Path(tempfile.mkdtemp(prefix="bench-train-")) / "store"
    spec, sha = load_spec(REPO / "recipes" / "medbank_samples.yaml")
    build(spec, folder, sha, progress=False)
    return str(folder)


def launch(args, processes: int) -> float:
    cmd = [sys.executable, __file__, "--worker", "--store", args.store, "--variant", args.variant,
           "--size", str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
           "--save-every", str(args.save_every)]  # fmt: skip
    env = dict(os.environ)
    if processes > 1:
        accelerate = Path(sys.executable).parent / "accelerate"
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *cmd[1:]]  # fmt: skip
        env.update(
            ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(max(1, args.threads // processes))
        )
    else:
        env.update(OMP_NUM_THREADS=str(args.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])["step_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="test-tiny")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="global batch (images per step)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--store", help="medbank store (default: build the bundled samples)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        engine_worker(args)
        return
    args.store = args.store or build_store()
    torch.set_num_threads(args.threads)
    plain = plain_sam2(args)
    rows = [("plain SAM 2 loop, 1 process", plain)]
    rows.append(("engine, 1 process", launch(args, 1)))
    rows.append(("engine, 2 CPU processes (gloo)", launch(args, 2)))
    print(f"\n{args.variant} at {args.size} px, global batch {args.batch}, fp32, {args.threads} "
          f"threads in all, checkpoint every {args.save_every} steps, {args.steps} steps\n")  # fmt: skip
    print("| arm | s/step | steps/s | images/s | x plain SAM 2 (time) |")
    print("| --- | --- | --- | --- | --- |")
    for name, s in rows:
        print(f"| {name} | {s:.3f} | {1 / s:.2f} | {args.batch / s:.1f} | {s / plain:.2f} |")


if __name__ == "__main__":
    main()
