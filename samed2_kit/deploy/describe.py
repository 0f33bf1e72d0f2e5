"""What an export folder's manifest.json says: each graph's entry (file, digest, inputs and
outputs as the ONNX file declares them), the preprocessing a runtime must repeat, the decoder's
settings and the model it came from (`samed2_kit.deploy.export` writes it)."""

from __future__ import annotations

from pathlib import Path

import torch

from samed2_kit.deploy import graphs as G
from samed2_kit.deploy.contract import FORMAT, FORMAT_VERSION, require


def graph_entry(path: Path, **extra) -> dict:
    """A graph's manifest entry: file name, sha256, inputs and outputs as the ONNX file declares
    them (name, shape with symbolic dims as strings, numpy dtype name)."""
    from samed2_kit.utils.atomic import sha256_file

    onnx = require("onnx")
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            out.append({"name": v.name, "shape": dims, "dtype": dtype})
        return out

    return {"file": path.name, "sha256": sha256_file(path), "inputs": describe(m.graph.input),
            "outputs": describe(m.graph.output), **extra}  # fmt: skip


def adapter_kinds(model) -> dict:
    """The adapters of `model` as the manifest lists them (`adapters.io.describe_adapters`)."""
    from samed2_kit.adapters.io import describe_adapters

    return describe_adapters(model)


def preprocessing(image_size: int) -> dict:
    """What a runtime must do to an image and to prompts before the graphs, and to the outputs
    after (the torch Predictor's steps, `samed2_kit.model.predictor`)."""
    from samed2_kit.medbank.preprocess import DEFAULT_CT_WINDOW, IMAGENET_MEAN, IMAGENET_STD

    return {
        "image_size": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": (
            "intensities mapped to [0, 1] per modality (below), grey replicated to 3 channels, "
            f"resized to {image_size} x {image_size} (bilinear, antialias, align_corners=False; "
            "aspect ratio not kept), then (x - mean) / std per channel, channels first"
        ),
        "intensity": {
            "ct": "clip HU to [level - width / 2, level + width / 2], scale to [0, 1]",
            "mr": "clip to the 0.5 and 99.5 percentiles of the image, scale to [0, 1]",
            "2d": "uint8 / 255; float already in [0, 1] as is; anything else min-max to [0, 1]",
            "auto": "a CT window given -> ct; uint8 or RGB -> 2d; int/float with min < -100 -> "
            "ct (HU); else 2d",
        },
        "defaults": {
            "modality": "auto",
            "ct_window": list(DEFAULT_CT_WINDOW),
            "mr_percentiles": [0.5, 99.5],
        },  # fmt: skip
        "coordinates": (
            f"points and boxes (x, y) in original pixels times ({image_size} / W, "
            f"{image_size} / H); box corners first (labels 2, 3), then clicks (1 fg, 0 bg), then "
            "one padding point (0, 0) labelled -1 whenever any point or box is given"
        ),
        "postprocessing": (
            "low-res logits (S/4) upsampled bilinearly (align_corners=False) to H x W, mask = "
            "logits > 0; mask_input: an earlier low-res logit map (clamped to [-32, 32])"
        ),
    }


def _decoder_settings(model) -> dict:
    dec = model.sam.sam_mask_decoder
    return {
        "mask_tokens": int(dec.num_mask_tokens),
        "multimask": [1, int(dec.num_mask_tokens)],
        "single_mask": 0,
        "dynamic_multimask_via_stability": bool(dec.dynamic_multimask_via_stability),
        "stability_delta": float(dec.dynamic_multimask_stability_delta),
        "stability_thresh": float(dec.dynamic_multimask_stability_thresh),
    }


def manifest(model, entries: dict, plan: G.SourcePlan, run: dict | None, opset: int,
             trained_size: int, quantization: dict | None = None) -> dict:  # fmt: skip
    """What `manifest.json` holds (see the module docstring); `quantization`: what
    `quantize_encoders` returned (None: fp32 graphs)."""
    from samed2_kit import __version__
    from samed2_kit.adapters import lora

    memory = getattr(model, "memory", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "samed2_kit_version": __version__,
        "torch_version": torch.__version__,
        "onnx_version": require("onnx").__version__,
        "opset": opset,
        "spec": model.spec.to_dict(),
        "modalities": (run or {}).get("modalities", []),  # of the training data (predict's auto)
        "trained_image_size": trained_size,
        "source_run": run,
        "model": {
            "adapters": adapter_kinds(model),
            "lora_merged": lora.active_lora(model),
            "sources": plan.included,
            "sources_left_out": plan.left_out,
            "memory": None if memory is None else "empty confidence memory (no effect), left out",
        },
        "decoder": _decoder_settings(model),
        "graphs": entries,
        "quantization": quantization,
        "preprocessing": preprocessing(model.image_size),
    }
