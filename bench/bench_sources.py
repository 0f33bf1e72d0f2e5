"""Benchmark: the prompt sources' added time per training step and per prediction.

One model per (variant, px), seeded; the sources are made with `add_sources` (classes
["organ"]) once per source set and swapped onto it per call, so every arm runs the same weights on
the same inputs. Arms: plain SAM 2 (sam2's image encoder, no_mem_embed, prompt encoder and mask
decoder called directly); the wrapper with no sources (also with the support images passed: they
are encoded in the same pass as the queries and read by no source, the encoder load of the
few-shot arms without their source); + similarity prior (pool filled beforehand by train-mode
candidates/commit, warmup_updates=0); + similarity prior with DS-GIM; + hard prototypes (episodes:
query b has support image + mask b, support_index = arange(B); the step time includes encoding the
supports), prompted with the box and the support or with no prompt (the source's clicks); + both.

Training step: forward + `SegLoss` (with `source_logits`) + backward + AdamW over every parameter,
plus `candidates` after backward and `commit` after the step for the similarity prior (as the
training loop); batch 4, fp32, median of --steps steps per arm, arms run in turn after --warmup
rounds. Prediction: ms per `Predictor.predict` (one box, one mask) after `set_image`, with
`set_support` (1 support) done once for the few-shot arms; plain SAM 2 is the prompt encoder + mask
decoder on cached features. Calls slower than --slow s get 3 repeats (column n).

    .venv/bin/python bench/bench_sources.py [--models test-tiny,tiny] [--steps N] [--repeats 30]
        [--predict test-tiny@256,tiny@512,tiny@1024] [--threads 2] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch import nn

from samed2_kit.losses import SegLoss
from samed2_kit.medbank.preprocess import normalize_intensity, to_model_input
from samed2_kit.model import Prompts, build_model
from samed2_kit.model.assemble import add_sources
from samed2_kit.model.predictor import Predictor
from samed2_kit.sources.hard import HardPrototypesConfig
from samed2_kit.sources.similarity import SimilarityPriorConfig

CLASSES = ["organ"]
BOX = (0.2, 0.2, 0.7, 0.8)  # x0, y0, x1, y1 as fractions of the side; the gt is this rectangle


def source_sets() -> dict[str, dict]:
    sim, hard = SimilarityPriorConfig(warmup_updates=0), HardPrototypesConfig()
    dsgim = SimilarityPriorConfig(warmup_updates=0, dsgim=True)
    return {
        "none": {},
        "sim": {"similarity_prior": sim},
        "dsgim": {"similarity_prior": dsgim},
        "hard": {"hard_prototypes": hard},
        "both": {"similarity_prior": sim, "hard_prototypes": hard},
    }


# key: (label, source set, prompt: box | box+support | support (no prompt))
TRAIN_ARMS = {
    "plain": ("plain SAM 2", None, "box"),
    "wrapper": ("wrapper, no sources", "none", "box"),
    "wrapper_sup": ("wrapper, no sources, supports encoded", "none", "box+support"),
    "sim": ("+ similarity prior", "sim", "box"),
    "dsgim": ("+ similarity prior with DS-GIM", "dsgim", "box"),
    "hard_box": ("+ hard prototypes", "hard", "box+support"),
    "hard_few": ("+ hard prototypes", "hard", "support"),
    "both_box": ("+ both sources", "both", "box+support"),
    "both_few": ("+ both sources", "both", "support"),
}
PREDICT_ARMS = {k: v for k, v in TRAIN_ARMS.items() if k != "wrapper_sup"}
PROMPT_NAMES = {"box": "box", "box+support": "box + support", "support": "none (few-shot)"}


def plain_encode(sam, images):
    """sam2's image path without the wrapper: (image embedding, high-res FPN maps)."""
    _, feats, _, sizes = sam._prepare_backbone_features(sam.forward_image(images))
    feats[-1] = feats[-1] + sam.no_mem_embed
    b = images.shape[0]
    maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(feats, sizes, strict=True)]
    return maps[-1], maps[:-1]


def plain_decode(sam, embed, high_res, boxes):
    """Prompt encoder (box corners, labels 2/3) + mask decoder: masks, iou, object score."""
    labels = torch.tensor([[2, 3]]).expand(len(boxes), 2)
    sparse, dense = sam.sam_prompt_encoder(points=(boxes.reshape(-1, 2, 2), labels), boxes=None,
                                           masks=None)  # fmt: skip
    masks, iou, _, obj = sam.sam_mask_decoder(
        image_embeddings=embed, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        repeat_image=embed.shape[0] != len(boxes), high_res_features=high_res,
    )  # fmt: skip
    return masks, iou, obj


def attach_sets(model) -> dict:
    """{set name: (prompt_sources, source_gates)} made with add_sources, seeded alike."""
    sets = {}
    for name, cfg in source_sets().items():
        model.prompt_sources, model.source_gates = nn.ModuleDict(), nn.ParameterDict()
        model.source_kinds = {}
        torch.manual_seed(1)
        add_sources(model, cfg, CLASSES)
        sets[name] = (model.prompt_sources, model.source_gates)
    return sets


def use(model, sets: dict, name: str) -> None:
    model.prompt_sources, model.source_gates = sets[name]


@torch.no_grad()
def prefill(model, sets: dict, batches: list, gt, meta) -> int:
    """Fill every similarity prior's pool by train-mode candidates + commit; returns min filled."""
    model.train()
    feats = [model.encode(x) for x in batches]
    filled = []
    for sources, _ in sets.values():
        for src in sources.values():
            if hasattr(src, "commit"):
                for i, f in enumerate(feats):
                    src.commit([src.rows_from(f, gt[: len(batches[i])], meta)], 1.0 - 0.01 * i)
                filled.append(int(src.filled.min()))
    return min(filled)


def rectangle(size: int, batch: int) -> torch.Tensor:
    x0, y0, x1, y1 = (round(v * size) for v in BOX)
    gt = torch.zeros(batch, 1, size, size)
    gt[:, :, y0:y1, x0:x1] = 1
    return gt


def timed_round(fns: dict, repeats: dict, warmup: int) -> dict:
    """Seconds of each call, run in turn (a, b, c, a, b, c, ...) after `warmup` rounds; fn k runs
    repeats[k] times (fewer for slow calls)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for r in range(max(repeats.values())):
        for k, fn in fns.items():
            if r < repeats[k]:
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return times


def bench_train(variant: str, size: int, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, image_size=size)
    sam, sets = model.sam, attach_sets(model)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen)
    supports = torch.randn(batch, 3, size, size, generator=gen)
    boxes = torch.tensor([BOX]).repeat(batch, 1) * size
    gt, meta = rectangle(size, batch), {"task": CLASSES * batch}
    fills = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(3)]
    filled = prefill(model, sets, fills, gt, meta)
    params = {id(p): p for p in model.sam.parameters()}
    for srcs, gates in sets.values():
        params.update({id(p): p for p in [*srcs.parameters(), *gates.parameters()]})
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
    loss_fn, index = SegLoss(), torch.arange(batch)
    model.train()

    def plain():
        masks, iou, obj = plain_decode(sam, *plain_encode(sam, images), boxes)
        loss_fn(masks, iou, obj, gt).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def arm(set_name: str, prompt: str):
        kwargs = {}
        if "support" in prompt:
            kwargs = {"support_images": supports, "support_masks": gt, "support_index": index}
        prompts = Prompts(boxes=boxes) if prompt.startswith("box") else Prompts()

        def go():
            use(model, sets, set_name)
            out = model(images, prompts, meta=meta, **kwargs)
            loss = loss_fn(out.low_res_logits, out.iou, out.object_score_logits, gt,
                           out.source_logits)  # fmt: skip
            loss.total.backward()
            stateful = {n: s for n, s in model.prompt_sources.items() if hasattr(s, "commit")}
            items = {n: s.rows_from(out.encoder_features, gt, meta) for n, s in stateful.items()}
            opt.step()
            opt.zero_grad(set_to_none=True)
            for n, s in stateful.items():
                s.commit([items[n]], float(loss.total.detach()))

        return go

    fns = {k: plain if s is None else arm(s, p) for k, (_, s, p) in TRAIN_ARMS.items()}
    times = timed_round(fns, dict.fromkeys(fns, steps), warmup)
    return {"variant": variant, "size": size, "batch": batch, "pool_filled": filled,
            "times": times}  # fmt: skip


def bench_predict(variant: str, size: int, repeats: int, slow: float) -> dict:
    torch.manual_seed(0)
    model = build_model(variant, image_size=size)
    sets = attach_sets(model)
    gen = torch.Generator().manual_seed(0)
    fills = [torch.randn(2, 3, size, size, generator=gen) for _ in range(2)]
    filled = prefill(model, sets, fills, rectangle(size, 2), {"task": CLASSES * 2})
    model.eval()
    rng = np.random.default_rng(0)
    image, support = (rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(2))
    mask = rectangle(size, 1)[0, 0].numpy() > 0
    box = np.array(BOX) * size
    pred = Predictor(model)
    few = min(repeats, 3)
    t0 = time.perf_counter()
    pred.set_image(image, modality="2d")
    set_image = time.perf_counter() - t0
    use(model, sets, "hard")
    sup_times = timed_round({"s": lambda: pred.set_support(support, mask, modality="2d")},
                            {"s": few}, 1)["s"]  # fmt: skip
    sup = pred._support  # the arms without a few-shot source predict without it, as a user would
    x = to_model_input(normalize_intensity(image, modality="2d"), size)[None]
    with torch.no_grad():
        embed, high_res = plain_encode(model.sam, x)
    boxes = torch.tensor(box, dtype=torch.float32)[None]

    def plain():
        with torch.no_grad():
            plain_decode(model.sam, embed, high_res, boxes)

    def arm(set_name: str, prompt: str):
        def go():
            use(model, sets, set_name)
            pred._support = sup if "support" in prompt else None
            pred.predict(box=box if prompt.startswith("box") else None, multimask_output=False)

        return go

    fns = {k: plain if s is None else arm(s, p) for k, (_, s, p) in PREDICT_ARMS.items()}
    counts = {}
    for k, fn in fns.items():  # one untimed call each (the warm-up) sizes the repeats
        t0 = time.perf_counter()
        fn()
        counts[k] = repeats if time.perf_counter() - t0 < slow else few
    times = timed_round(fns, counts, 0)
    return {"variant": variant, "size": size, "pool_filled": filled, "set_image_s": set_image,
            "set_support_s": sup_times, "times": times}  # fmt: skip


def loadavg() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def print_train(res: dict, steps: int) -> None:
    m = {k: statistics.median(v) for k, v in res["times"].items()}
    b = res["batch"]
    print(f"### Training step: `{res['variant']}` at {res['size']} px, batch {b}\n")
    print(f"s/step: median of {steps} steps per arm, run in turn; similarity pools filled "
          f"({res['pool_filled']} of {SimilarityPriorConfig().slots} slots per class at least). Added: against the wrapper "
          "with the same images encoded (the supports-encoded row for the support arms).\n")  # fmt: skip
    print("| arm | prompt | images encoded | s/step | x plain SAM 2 | x wrapper | added (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for k, (label, _, prompt) in TRAIN_ARMS.items():
        ref = m["wrapper_sup"] if "support" in prompt else m["wrapper"]
        added = f"{m[k] - ref:+.3f}" if k not in ("plain", "wrapper", "wrapper_sup") else ""
        n = 2 * b if "support" in prompt else b
        print(f"| {label} | {PROMPT_NAMES[prompt]} | {n} | {m[k]:.3f} | {m[k] / m['plain']:.2f}x "
              f"| {m[k] / m['wrapper']:.2f}x | {added} |")  # fmt: skip
    print()


def print_predict(res: dict) -> None:
    m = {k: statistics.median(v) for k, v in res["times"].items()}
    print(f"### Prediction: `{res['variant']}` at {res['size']} px\n")
    print(f"ms per call, median (n = calls timed). set_image {res['set_image_s'] * 1e3:.0f} ms "
          f"(once); set_support with 1 support {statistics.median(res['set_support_s']) * 1e3:.0f} ms (median "
          f"of {len(res['set_support_s'])}; encodes the support). Plain SAM 2: prompt encoder + "
          "mask decoder on cached features; the others: `Predictor.predict` (+ upsampling to the "
          "image and the copy to numpy).\n")  # fmt: skip
    print("| arm | prompt | ms/predict | n | x plain SAM 2 | x wrapper | added (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for k, (label, _, prompt) in PREDICT_ARMS.items():
        added = f"{(m[k] - m['wrapper']) * 1e3:+.1f}" if k not in ("plain", "wrapper") else ""
        print(f"| {label} | {PROMPT_NAMES[prompt]} | {m[k] * 1e3:.1f} | {len(res['times'][k])} "
              f"| {m[k] / m['plain']:.2f}x | {m[k] / m['wrapper']:.2f}x | {added} |")  # fmt: skip
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="test-tiny,tiny", help="variants for the training table")
    ap.add_argument("--size", type=int, default=256, help="px of the training step")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, help="timed steps per arm (default 30 test-tiny, 10 else)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing steps")
    ap.add_argument("--predict", default="test-tiny@256,tiny@512,tiny@1024",
                    help="variant@px of the prediction tables (variants not in --models skipped)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=30, help="predict calls per arm")
    ap.add_argument("--slow", type=float, default=1.0, help="s per predict above which only 3 run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the raw seconds here")
    ap.add_argument("--quick", action="store_true", help="smoke test: test-tiny, a few repeats")
    args = ap.parse_args()
    if args.quick:
        args.models, args.steps, args.warmup, args.repeats = "test-tiny", 3, 1, 5
        args.predict = "test-tiny@256"
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} cpus={os.cpu_count()}, "
          f"{loadavg()} at the start (other processes skew the arms, and not alike)\n")  # fmt: skip
    t0 = time.perf_counter()
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args),
           "train": [], "predict": []}  # fmt: skip
    for variant in models:
        steps = args.steps or (30 if variant == "test-tiny" else 10)
        res = bench_train(variant, args.size, args.batch, steps, args.warmup)
        print_train(res, steps)
        out["train"].append(res)
    for spec in args.predict.split(","):
        variant, px = spec.split("@")
        if variant in models:
            res = bench_predict(variant, int(px), args.repeats, args.slow)
            print_predict(res)
            out["predict"].append(res)
    print(f"total {time.perf_counter() - t0:.0f} s; {loadavg()} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
