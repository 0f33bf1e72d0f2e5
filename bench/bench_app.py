"""Server time of one click in the app (`samed2 app`), against SAM 2's own decoder call.

For `tiny` (random init: speed only) at each size, on the bundled HC18 image (800 x 540), after
the image is encoded once:

- SAM 2 decoder + upsample: SAM 2's prompt encoder and mask decoder on the cached features, the
  logits upsampled to 800 x 540 and thresholded (`bench_predict.sam2_decoder`, box prompt);
- app click (mask): `Session.click` of one positive point (three candidates, the best kept), as
  the app's handler runs it (the prompt cleared before each click so every call is a first click);
- app click (answer): the same + the picture (`Session.picture`: overlay, markers) + its JPEG
  encoding (what Gradio sends to the page) = the handler's server time for a click,
with the app's two backends: onnxruntime (the default when installed) and torch.
Medians of interleaved calls (`_common.alternate`); "x SAM 2" = SAM 2's time / the arm's.

    .venv/bin/python bench/bench_app.py [--sizes 512,1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from _common import alternate
from bench_inference import HC18, IMAGE_BOX, cpu_line
from bench_predict import sam2_decoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def encoded(picture: np.ndarray) -> int:
    """Bytes of the picture as Gradio sends it to the page (JPEG, Gradio's own encoder)."""
    from gradio.processing_utils import encode_pil_to_bytes
    from PIL import Image

    return len(encode_pil_to_bytes(Image.fromarray(picture), "jpeg"))


def arms(size: int) -> dict:
    from samed2_kit.app.engine import Engine
    from samed2_kit.app.files import open_input
    from samed2_kit.app.session import Session
    from samed2_kit.model.build import build_model

    torch.manual_seed(0)
    model = build_model("tiny", image_size=size).eval()
    opened = open_input(HC18)
    h, w = opened.volume.array.shape[1:3]
    out = {}
    for name, backend in (("onnxruntime", "auto"), ("torch", "torch")):
        s = Session(Engine.open(model, backend=backend), Path("."))
        s.open(opened)
        s.click(w / 2, h / 2)  # encodes the image once

        def click(s=s):
            s.clear()
            s.click(w / 2, h / 2)

        def answer(s=s):
            click(s)
            encoded(s.picture())

        out[f"app click (mask), {name}"] = click
        out[f"app click (answer), {name}"] = answer
    feats = Session(Engine.open(model, backend="torch"), Path("."))
    feats.open(opened)
    feats.click(w / 2, h / 2)
    direct = sam2_decoder(model, feats.predictor._features, IMAGE_BOX, (h, w), upsample=True)
    return {"SAM 2 decoder + upsample": direct, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print(cpu_line(), flush=True)
    rows = []
    for size in [int(v) for v in args.sizes.split(",")]:
        fns = arms(size)
        t = alternate(fns, args.repeats)
        base = t["SAM 2 decoder + upsample"]
        rows += [(size, name, t[name] * 1000, base / t[name]) for name in fns]
    print("\n| size | arm | ms per click | x SAM 2 |\n| --- | --- | --- | --- |")
    for size, name, ms, ratio in rows:
        print(f"| {size} | {name} | {ms:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
