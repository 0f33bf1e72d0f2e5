"""Inference speed on CPU, one table: `set_image`, prompt -> mask and volume propagation with torch
fp32, torch bf16 autocast, torch.compile, onnxruntime fp32 and onnxruntime with the image encoder
quantised to int8 (`samed2 export --quantize int8`), each against SAM 2's own modules called
directly (same weights, same inputs, same process).

- set_image (ms): `Predictor.set_image` on the bundled HC18 image (800 x 540, uint8 -> 2d).
  SAM 2: the same intensity mapping and resize, then `SAM2Base.forward_image` +
  `_prepare_backbone_features`.
- prompt -> mask (ms): `Predictor.predict(box=..., multimask_output=False)` after set_image,
  including the upsampling to 800 x 540. SAM 2: its prompt encoder + mask decoder on the same
  features + the same upsampling (`bench_predict.sam2_decoder`).
- propagation (slices/s): `propagate_volume` from a box on slice 0 up through the first
  `--slices` slices of the bundled brain MR (`bench_predict.BRAIN`), encoder included. SAM 2:
  `SAM2Base.track_step` slice after slice (`bench_predict.sam2_video`).

Times are medians of interleaved calls after a warm-up call each (`_common.alternate`); "x SAM 2" is
SAM 2's time over the arm's (> 1: faster). torch.compile compiles the image encoder, prompt
encoder, mask decoder, memory attention and memory encoder in place (`nn.Module.compile`); its
compile time is the first call's time less the median, with a fresh inductor cache. An arm that
fails is left out, its reason in the notes. Also printed: the int8 variants tried on the encoder
alone (QInt8 / QUInt8 weights, per tensor / per channel, MatMul only / every op quantize_dynamic
takes), and with `--dice RUN` the box-prompt Dice of a trained run on its test split through
torch (fp32, bf16) and the fp32 and int8 exports.

    .venv/bin/python bench/bench_inference.py [--variant tiny] [--sizes 512,1024] [--repeats 10]
        [--prop-repeats 1] [--slices 12] [--no-compile] [--dice runs/quickstart]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import alternate
from bench_predict import BRAIN, sam2_decoder, sam2_video

REPO = Path(__file__).resolve().parents[1]
HC18 = REPO / "samed2_kit" / "sample_data" / "hc18" / "images" / "000_HC.png"
IMAGE_BOX = np.array([180.0, 90.0, 620.0, 450.0])  # around the head in 000_HC.png (800 x 540)
VOLUME_BOX = np.array([80.0, 70.0, 180.0, 170.0])  # bench_predict's
ARMS = ("SAM 2 (its modules, fp32)", "torch fp32", "torch bf16 autocast", "torch.compile",
        "onnxruntime fp32", "onnxruntime int8 encoder")  # fmt: skip
COMPILED = ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "memory_attention",
            "memory_encoder")  # fmt: skip
CPU_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_line() -> str:
    """The CPU model, its cores and which of `CPU_FLAGS` it has (from /proc/cpuinfo)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                      if ln.startswith("flags")), []))  # fmt: skip
    have = [f for f in CPU_FLAGS if f in flags]
    return (
        f"{model}, {os.cpu_count()} cores, flags: {', '.join(have) or 'none of ' + str(CPU_FLAGS)}"
    )


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def compiled_copy(model):
    """A deep copy of `model` whose heavy sam2 modules are compiled in place (COMPILED)."""
    out = copy.deepcopy(model)
    for name in COMPILED:
        getattr(out.sam, name).compile()
    return out


def timed_first(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def in_context(ctx, fn):
    """fn() under a fresh context from `ctx` (a context factory) and torch.no_grad()."""

    def call():
        with ctx(), torch.no_grad():
            return fn()

    return call


def predictors(model, exports: dict, compile_: bool, notes: dict) -> dict:
    """{arm: (Predictor, context factory)} of every arm but SAM 2's; arms that cannot be made
    are noted and left out."""
    from samed2_kit.deploy.runtime import OnnxModel
    from samed2_kit.model.predictor import Predictor

    null = contextlib.nullcontext
    out = {"torch fp32": (Predictor(model, backend="torch"), null),
           "torch bf16 autocast": (Predictor(model, backend="torch"), bf16)}  # fmt: skip
    if compile_:
        try:
            out["torch.compile"] = (Predictor(compiled_copy(model), backend="torch"), null)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            notes["torch.compile"] = f"skipped: {type(e).__name__}: {str(e)[:120]}"
    else:
        notes["torch.compile"] = "skipped (--no-compile)"
    for arm, folder in exports.items():
        out[arm] = (Predictor(OnnxModel(folder, threads=torch.get_num_threads()),
                              backend="onnx"), null)  # fmt: skip
    return out


def measure(fns: dict, repeats: int, notes: dict, what: str) -> dict[str, float]:
    """`alternate` over the arms' calls after a first call each, timed (compile time for the
    compiled arm); an arm whose first call fails is noted and left out."""
    firsts, ok = {}, {}
    for arm, fn in fns.items():
        try:
            firsts[arm] = timed_first(fn)
            ok[arm] = fn
            print(f"  {what}, {arm}: first call {firsts[arm]:.2f} s", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            notes[arm] = f"{what} failed: {type(e).__name__}: {str(e)[:120]}"
    med = alternate(ok, repeats)
    if "torch.compile" in med:
        notes.setdefault("compile", []).append(
            f"{what} {firsts['torch.compile'] - med['torch.compile']:.0f} s"
        )
    return med


def one_size(variant: str, size: int, repeats: tuple[int, int], compile_: bool, image, volume,
             slices01):  # fmt: skip
    """{measure: {arm: seconds (slices/s for propagation)}}, notes, and the quantisation
    variants table rows, at `size` px. repeats: (timed calls, timed propagations) per arm."""
    from samed2_kit.deploy.export import export_onnx
    from samed2_kit.medbank.preprocess import normalize_intensity, to_model_input
    from samed2_kit.model import build_model
    from samed2_kit.volume import propagate_volume

    repeats, prop_repeats = repeats
    torch._dynamo.reset()  # else the second size recompiles everything with dynamic shapes
    torch.manual_seed(0)
    model = build_model(variant, image_size=size).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    exports = {"onnxruntime fp32": export_onnx(model, tmp / "fp32"),
               "onnxruntime int8 encoder": export_onnx(model, tmp / "int8", quantize="int8")}  # fmt: skip
    notes: dict = {}
    preds = predictors(model, exports, compile_, notes)
    sam, hw = model.sam, image.shape[:2]

    x = to_model_input(normalize_intensity(image), size)[None]

    def sam2_set_image():
        x2 = to_model_input(normalize_intensity(image), size)[None]
        return sam._prepare_backbone_features(sam.forward_image(x2))

    fns = {ARMS[0]: in_context(contextlib.nullcontext, sam2_set_image)}
    fns |= {a: in_context(c, lambda p=p: p.set_image(image)) for a, (p, c) in preds.items()}
    res = {"set_image": measure(fns, repeats, notes, "set_image")}

    for arm, (p, _) in preds.items():  # drop the arms whose set_image failed
        if p._features is None:
            preds[arm] = None
    preds = {a: v for a, v in preds.items() if v is not None}
    feats = preds["torch fp32"][0]._features
    fns = {ARMS[0]: sam2_decoder(model, feats, IMAGE_BOX, hw, upsample=True)}
    fns |= {a: in_context(c, lambda p=p: p.predict(box=IMAGE_BOX, multimask_output=False))
            for a, (p, c) in preds.items()}  # fmt: skip
    res["prompt_to_mask"] = measure(fns, repeats, notes, "predict")

    z = len(slices01)
    prompts = {0: {"box": VOLUME_BOX}}
    fns = {ARMS[0]: lambda: sam2_video(model, slices01, VOLUME_BOX)}
    for arm, (p, ctx) in preds.items():
        if p.onnx is not None:
            kw = {"backend": "onnx", "export_dir": exports[arm]}
            run = lambda kw=kw: propagate_volume(None, volume, prompts, modality="mr",  # noqa: E731
                                                 direction="up", **kw)  # fmt: skip
        else:
            run = lambda m=p.model: propagate_volume(m, volume, prompts, modality="mr",  # noqa: E731
                                                     direction="up")  # fmt: skip
        fns[arm] = in_context(ctx, run)
    secs = measure(fns, prop_repeats, notes, "propagation")
    res["propagation"] = {a: z / t for a, t in secs.items()}
    quant = quant_variants(exports["onnxruntime fp32"], x.numpy(), repeats)
    return res, notes, quant


def quant_variants(fp32_dir: Path, x: np.ndarray, repeats: int) -> list[tuple]:
    """The encoder of `fp32_dir` quantised dynamically in each variant, timed on input `x`
    against fp32: rows (weights, per channel, ops, ms, x fp32, max |diff| of image_embed /
    max |image_embed|, is the export's setting)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from samed2_kit.deploy.export import QUANT_SETTINGS

    src = fp32_dir / "image_encoder.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3

    def session(path):
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    variants = [(w, pc, ops) for ops in (("MatMul",), None) for w in ("QInt8", "QUInt8")
                for pc in (False, True)]  # fmt: skip
    sessions = {"fp32": session(src)}
    ref = sessions["fp32"].run(["image_embed"], {"image": x})[0]
    errs = {}
    for w, pc, ops in variants:
        dst = src.with_name(f"enc-{w}-{pc}-{ops is None}.onnx")
        quantize_dynamic(src, dst, weight_type=getattr(QuantType, w), per_channel=pc,
                         op_types_to_quantize=list(ops) if ops else None)  # fmt: skip
        s = sessions[(w, pc, ops)] = session(dst)
        out = s.run(["image_embed"], {"image": x})[0]
        errs[(w, pc, ops)] = float(np.abs(out - ref).max() / np.abs(ref).max())
    med = alternate({k: (lambda s=s: s.run(None, {"image": x})) for k, s in sessions.items()},
                    repeats)  # fmt: skip
    chosen = (QUANT_SETTINGS["weight_type"], QUANT_SETTINGS["per_channel"],
              tuple(QUANT_SETTINGS["op_types"]))  # fmt: skip
    return [(w, pc, "MatMul" if ops else "all (MatMul, Conv, ...)", 1000 * med[(w, pc, ops)],
             med["fp32"] / med[(w, pc, ops)], errs[(w, pc, ops)], (w, pc, ops) == chosen)
            for w, pc, ops in variants] + [("fp32", "", "", 1000 * med["fp32"], 1.0, 0.0, False)]  # fmt: skip


def dice_change(run: str, store: str | None) -> list[tuple]:
    """Box-prompt Dice of run folder `run` on its test split (`store`: default the run's) through
    torch fp32, torch bf16 autocast, and its fp32 and int8 exports: rows (predictor, mean Dice,
    n)."""
    from samed2_kit.config import EvalConfig
    from samed2_kit.deploy.export import export_onnx
    from samed2_kit.engine.evaluate import eval_items, evaluate_item
    from samed2_kit.medbank.store import default_store
    from samed2_kit.model.assemble import load, read_manifest
    from samed2_kit.model.predictor import Predictor

    data = read_manifest(Path(run))["recipe"]["data"]
    store = store or data.get("store") or str(default_store(Path(run)))
    cfg = EvalConfig(prompt="box", split="test")
    items = eval_items(store, cfg, data.get("tasks"))
    model = load(run).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench_inference_dice_"))
    null = contextlib.nullcontext
    arms = {"torch fp32": (Predictor(model, backend="torch"), null),
            "torch bf16 autocast": (Predictor(model, backend="torch"), bf16),
            "onnxruntime fp32": (Predictor(export_onnx(run, tmp / "fp32"), backend="onnx"), null),
            "onnxruntime int8 encoder": (Predictor(export_onnx(run, tmp / "int8", quantize="int8"),
                                                   backend="onnx"), null)}  # fmt: skip
    rows = []
    for arm, (pred, ctx) in arms.items():
        with ctx(), torch.no_grad():
            out = [evaluate_item(pred, it, cfg) for it in items]
        dice = [r.dice for r, _ in (o for o in out if o is not None)]
        rows.append((arm, float(np.mean(dice)), len(dice)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per arm")
    p.add_argument("--prop-repeats", type=int, default=1, help="timed propagations per arm")
    p.add_argument("--slices", type=int, default=12, help="the volume's first N slices (0: all)")
    p.add_argument("--no-compile", action="store_true", help="leave the torch.compile arm out")
    p.add_argument("--dice", metavar="RUN", help="also: box-prompt Dice of this run folder's "
                   "test split, fp32 vs int8 export")  # fmt: skip
    p.add_argument("--store", help="the store --dice evaluates (default: the run's)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    # a fresh inductor cache: torch.compile's compile time is a cold one, not a cache hit
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_inference_inductor_")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice on the root logger
    import onnxruntime
    from PIL import Image

    from samed2_kit.medbank.io import read_volume
    from samed2_kit.volume.propagate import volume_intensity

    image = np.asarray(Image.open(HC18))
    volume = read_volume(BRAIN)
    if args.slices:
        volume.array = volume.array[: args.slices]
    slice01 = volume_intensity(volume.array, "mr", None)
    slices01 = [slice01(i) for i in range(len(volume.array))]
    print(f"{args.variant}, random init (seed 0; speed only), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}; "
          f"{cpu_line()}; load {os.getloadavg()[0]:.2f}; image {HC18.name} {image.shape[1]} x "
          f"{image.shape[0]}, volume {BRAIN.name} {len(slices01)} slices")  # fmt: skip
    sizes = [int(s) for s in args.sizes.split(",")]
    reps = (args.repeats, args.prop_repeats)
    results = {s: one_size(args.variant, s, reps, not args.no_compile, image, volume, slices01)
               for s in sizes}  # fmt: skip

    print("\n| px | arm | set_image | x SAM 2 | x torch fp32 | prompt -> mask | x SAM 2 | "
          "propagation | x SAM 2 | notes |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, (res, notes, _) in results.items():
        si, pm, pr = res["set_image"], res["prompt_to_mask"], res["propagation"]
        base = ARMS[0]
        for arm in ARMS:
            note = notes.get(arm, "")
            if arm == "torch.compile" and notes.get("compile"):
                note = "compile: " + ", ".join(notes["compile"])
            cells = []
            if arm in si:
                cells += [f"{1000 * si[arm]:.0f} ms", f"{si[base] / si[arm]:.2f}",
                          f"{si['torch fp32'] / si[arm]:.2f}" if "torch fp32" in si else "-"]  # fmt: skip
            else:
                cells += ["-"] * 3
            cells += ([f"{1000 * pm[arm]:.1f} ms", f"{pm[base] / pm[arm]:.2f}"] if arm in pm
                      else ["-"] * 2)  # fmt: skip
            cells += ([f"{pr[arm]:.2f} slices/s", f"{pr[arm] / pr[base]:.2f}"] if arm in pr
                      else ["-"] * 2)  # fmt: skip
            print(f"| {s} | {arm} | " + " | ".join(cells) + f" | {note} |")

    print("\nint8 variants of the image encoder alone (onnxruntime quantize_dynamic):\n")
    print("| px | weights | per channel | ops | encoder | x fp32 | max image_embed diff / max "
          "| the export's |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s, (_, _, quant) in results.items():
        for w, pc, ops, ms, x, err, chosen in quant:
            print(f"| {s} | {w} | {pc} | {ops} | {ms:.0f} ms | {x:.2f} | {err:.3f} | "
                  f"{'yes' if chosen else ''} |")  # fmt: skip

    big = max(sizes)
    pm = results[big][0]["prompt_to_mask"]
    best = min((a for a in pm if a != ARMS[0]), key=pm.get)
    print(f"\nGoal prompt -> mask <= 50 ms at {big} px: fastest {best} {1000 * pm[best]:.1f} ms: "
          f"{'met' if pm[best] <= 0.05 else 'not met'}")  # fmt: skip
    for s in sizes:
        si = results[s][0]["set_image"]
        best = max((a for a in si if a not in (ARMS[0], "torch fp32")),
                   key=lambda a: si["torch fp32"] / si[a])  # fmt: skip
        x = si["torch fp32"] / si[best]
        print(f"Goal set_image >= 1.5x faster than torch fp32 at {s} px: fastest {best} {x:.2f}x: "
              f"{'met' if x >= 1.5 else 'not met'}")  # fmt: skip

    if args.dice:
        rows = dice_change(args.dice, args.store)
        ref = dict((a, d) for a, d, _ in rows)["onnxruntime fp32"]
        print(f"\nBox-prompt Dice of {args.dice} on its test split:\n")
        print("| predictor | Dice | vs onnxruntime fp32 | n |")
        print("| --- | --- | --- | --- |")
        for arm, d, n in rows:
            print(f"| {arm} | {d:.4f} | {d - ref:+.4f} | {n} |")
    print(f"\nload at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
