"""`samed2 export`: a model as ONNX graphs plus a manifest, in one folder written atomically.

    export_onnx("runs/a", "runs/a-onnx")            # a run folder (or a SAMed2Model)
    export_onnx(model, "deploy/", image_size=512)   # rebuilt at 512 px, the same weights

An export folder:

    image_encoder.onnx       image (1, 3, S, S) -> image_embed, high_res_0, high_res_1 (LoRA
                             merged; temporal adapters at T = 1)
    image_encoder_clip.onnx  the same on a clip of T slices (T, 3, S, S), the centre slice's
                             features: only for a model with temporal adapters and clip_len T > 1
    prompt_decoder.onnx      prompt encoder + prompt sources + mask decoder: all four masks' low-res
                             logits, IoU, object score (`samed2_kit.deploy.graphs`)
    (memory graphs)          volume propagation's, when `samed2_kit.deploy.propagation` exists
    manifest.json            written last: format, versions, the model spec and what the model
                             holds, the source run's model.json sha256, per graph its file, sha256,
                             inputs and outputs (names, shapes with symbolic dims, dtypes), the
                             mask-selection settings, and the preprocessing (size, mean/std,
                             intensity rules, coordinates, postprocessing)

`quantize="int8"` (`samed2 export --quantize int8`) replaces the image encoder graph(s) by their
dynamic int8 quantisation (onnxruntime's `quantize_dynamic`: MatMul weights int8 per output
channel, activations quantised per call; `QUANT_SETTINGS`) before the digests are taken; the
manifest's "quantization" entry records it (null: fp32). The prompt decoder and the memory graphs
stay fp32 (their share of the time is small, their outputs are the masks).

Everything is written into a temporary sibling folder that is renamed into place on success
(`samed2_kit.utils.atomic.atomic_path`): a failed export leaves nothing (or the previous export).
Tracing uses torch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and gives
graphs whose outputs match torch to ~1e-6 (docs/deploy.md). onnx is imported inside functions
only.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from samed2_kit.deploy import graphs as G
from samed2_kit.deploy.contract import (
    CLIP_ENCODER,
    DECODER,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    DEFAULT_OPSET,
    ENCODER,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OPSETS,
    QUANTIZE,
    is_export_dir,
    require,
)

log = logging.getLogger(__name__)

PROPAGATION_MODULE = "samed2_kit.deploy.propagation"
# what `quantize="int8"` does to the image encoder(s): the fastest of QInt8 / QUInt8 weights, per
# tensor / per channel, MatMul / all supported ops, measured by bench/bench_inference.py (tiny,
# 2 CPU cores with AVX-512 VNNI + AMX): QInt8 on MatMul 1.8x faster than fp32, QUInt8 no faster,
# Conv (ConvInteger) slower; per channel: as fast, closer to fp32
QUANT_SETTINGS = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                  "per_channel": True, "op_types": ["MatMul"]}  # fmt: skip


def check_opset(opset, what: str = "opset") -> int:
    """`opset` if the exporter and the graphs support it, else a ValueError naming `what`."""
    lo, hi = OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(f"{what}={opset!r}: use an ONNX opset from {lo} to {hi} (default "
                         f"{DEFAULT_OPSET})")  # fmt: skip
    return opset


def check_quantize(quantize, what: str = "quantize") -> str | None:
    """`quantize` if it is None or one of `QUANTIZE`, else a ValueError naming `what`."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"{what}={quantize!r}: use one of {', '.join(QUANTIZE)}, or leave it out "
                         "for fp32 graphs")  # fmt: skip
    return quantize


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """`out` may be written: absent, an empty folder, or (with `overwrite`) an earlier export.
    Anything else is a ValueError naming the fix (nothing else is ever replaced)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise ValueError(f"out folder {out} exists and is not a folder: choose a new folder")
    if not any(out.iterdir()):
        return out
    if not is_export_dir(out):
        raise ValueError(f"out folder {out} exists and is not an export folder (no {MANIFEST} of "
                         f"format {FORMAT!r}): choose a new or empty folder")  # fmt: skip
    if not overwrite:
        raise ValueError(f"out folder {out} holds an earlier export: pass --overwrite to replace it, "
                         "or choose a new folder")  # fmt: skip
    return out


def load_for_export(run_or_model):
    """(model, source-run info or None) from a run folder or a SAMed2Model. Refuses what cannot
    be exported: a non-empty confidence memory, a prompt source returning memory entries or
    clicks (ValueError naming it)."""
    run = None
    if isinstance(run_or_model, (str, Path)):
        from samed2_kit.model.assemble import MANIFEST as RUN_MANIFEST
        from samed2_kit.model.assemble import load, read_manifest
        from samed2_kit.utils.atomic import sha256_file

        folder = Path(run_or_model)
        if not folder.is_dir():
            raise FileNotFoundError(f"RUN {folder} is not a folder: pass a run folder written by "
                                    "`samed2 train` (model.json + model.safetensors)")  # fmt: skip
        if is_export_dir(folder):
            raise ValueError(f"{folder} is an ONNX export folder, not a run folder: pass the run "
                             "folder it was exported from")  # fmt: skip
        saved = read_manifest(folder)  # names the file when missing, unreadable or newer
        run = {"path": str(folder.resolve()),
               "model_json_sha256": sha256_file(folder / RUN_MANIFEST),
               "modalities": saved.get("modalities", [])}  # fmt: skip
        model = load(folder)
    else:
        model = run_or_model
    _check_memory(model)
    G.exportable_sources(model)
    return model, run


def _check_memory(model) -> None:
    memory = getattr(model, "memory", None)
    if memory is not None and len(memory.bank):
        raise ValueError(
            f"the model has a confidence memory with {len(memory.bank)} entries: retrieval from "
            "it is not part of the ONNX export; predict with backend='torch', or export a copy "
            "without it (model.memory = None; its predictions then differ from the model's)"
        )


def at_image_size(model, image_size: int):
    """A copy of `model` rebuilt at `image_size` px with the same weights, adapters and prompt
    sources (SAM 2's weights do not depend on the input size: Hiera's position embedding is
    interpolated). The predictions change with the size, as for any resized SAM 2."""
    from samed2_kit.adapters.io import describe_adapters, restore_adapters
    from samed2_kit.model.build import build_model
    from samed2_kit.registry import source_kind

    spec = model.spec
    new = build_model(spec.variant, None, image_size, clip_len=spec.clip_len)
    restore_adapters(new, describe_adapters(model), "the model being exported")
    for name, source in model.prompt_sources.items():
        kind = source_kind(model.source_kinds[name])
        new.add_prompt_source(name, kind.build(source.cfg, new, None), kind.name)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("memory.")}
    result = new.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("memory.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"cannot rebuild the model at image_size={image_size}: {len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected tensors (e.g. "
            f"{(missing + result.unexpected_keys)[:3]}); export at its own size "
            f"({model.image_size}) instead"
        )
    return new.to(next(model.parameters()).device)


def prepared(model):
    """The copy that is traced: LoRA merged and unwrapped, float32, CPU, eval mode."""
    out = G.merge_lora_into_copy(model)
    return out.float().cpu().eval()


def _export(module, args: tuple, path: Path, names: tuple, shapes: list, dynamic: dict,
            opset: int) -> None:  # fmt: skip
    """Trace `module` on `args` into `path`. `names`: (input names, output names); `shapes`:
    the outputs' shapes (none depends on a dynamic input axis here), written into the file (the
    TorchScript exporter leaves them as generated symbols)."""
    inputs, outputs = names
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and trace notes
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=dynamic or None, do_constant_folding=True)  # fmt: skip
    shapes = dict(zip(outputs, shapes, strict=True))
    onnx = require("onnx")
    m = onnx.load(str(path))
    for value in m.graph.output:
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=True):
            dim.Clear()
            dim.dim_value = int(size)
    onnx.save(m, str(path))


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


def export_graphs(model, folder: Path, opset: int = DEFAULT_OPSET) -> tuple[dict, G.SourcePlan]:
    """Trace the encoder graph(s) and the decoder graph of a `prepared` model into `folder`;
    returns ({graph name: manifest entry}, the source plan)."""
    s, t = model.image_size, int(model.spec.clip_len)
    h = s // 16
    out = {}
    names = (ENCODER_INPUTS, ENCODER_OUTPUTS)
    with torch.no_grad():
        image = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
        enc = G.EncoderGraph(model, 1)
        feats = enc(image)
        shapes = [tuple(f.shape) for f in feats]
        _export(enc, (image,), folder / f"{ENCODER}.onnx", names, shapes, {}, opset)
        out[ENCODER] = graph_entry(folder / f"{ENCODER}.onnx", clip_len=1)
        if t > 1 and "temporal" in _adapter_kinds(model):
            clip = (image.expand(t, -1, -1, -1).contiguous(),)
            path = folder / f"{CLIP_ENCODER}.onnx"
            _export(G.EncoderGraph(model, t), clip, path, names, shapes, {}, opset)
            out[CLIP_ENCODER] = graph_entry(path, clip_len=t)
        plan = G.exportable_sources(model)
        dec = G.DecoderGraph(model, plan)
        points = torch.tensor([[[10.0, 20.0], [s - 10.0, s - 20.0], [s / 2, s / 2], [0.0, 0.0]]])
        labels = torch.tensor([[2.0, 3.0, 1.0, -1.0]])
        args = (*feats[:3], points, labels, torch.zeros(1, 1, 4 * h, 4 * h), torch.ones(1))
        shapes = [tuple(o.shape) for o in dec(*args)]
        n = {1: "num_points"}
        _export(dec, args, folder / f"{DECODER}.onnx", (DECODER_INPUTS, DECODER_OUTPUTS),
                shapes, {"point_coords": n, "point_labels": n}, opset)  # fmt: skip
        out[DECODER] = graph_entry(folder / f"{DECODER}.onnx")
    return out, plan


def _adapter_kinds(model) -> dict:
    from samed2_kit.adapters.io import describe_adapters

    return describe_adapters(model)


def propagation_graphs(model, folder: Path, image_size: int, opset: int) -> dict:
    """The memory graphs of volume propagation, when `samed2_kit.deploy.propagation` exists:
    its `export_propagation(model, folder, image_size, opset) -> {name: manifest entry}`; entries
    naming a `file` get their sha256 (and inputs/outputs) filled in when missing."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(PROPAGATION_MODULE) is None:
        return {}
    fn = getattr(importlib.import_module(PROPAGATION_MODULE), "export_propagation", None)
    if fn is None:
        return {}
    entries = dict(fn(model, folder, image_size, opset) or {})
    for name, entry in entries.items():
        if isinstance(entry, dict) and entry.get("file"):
            found = graph_entry(folder / entry["file"])
            entries[name] = {**found, **entry, "sha256": found["sha256"]}
    return entries


class _DropQuantNotes:
    """A logging filter dropping onnxruntime.quantization's advice records (it logs through the
    root logger, e.g. "Please consider to run pre-processing before quantization")."""

    def filter(self, record) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


def quantize_encoders(folder: Path, entries: dict, quantize: str) -> dict:
    """Replace the image encoder graph(s) in `folder` by their dynamic int8 quantisation
    (`QUANT_SETTINGS`), each written to a temporary file first; returns the manifest's
    "quantization" entry. `entries` ({graph name: manifest entry}) is updated with the new files'
    digests, inputs and outputs (the encoder's I/O stays float32)."""
    import logging

    ort = require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    s = QUANT_SETTINGS
    done = []
    root = logging.getLogger()
    drop = _DropQuantNotes()
    root.addFilter(drop)
    try:
        for name in (ENCODER, CLIP_ENCODER):
            if name not in entries:
                continue
            path = folder / entries[name]["file"]
            tmp = path.with_name(f".{path.name}.int8")
            quantize_dynamic(path, tmp, weight_type=getattr(QuantType, s["weight_type"]),
                             per_channel=s["per_channel"], op_types_to_quantize=s["op_types"])  # fmt: skip
            tmp.replace(path)
            keep = {k: v for k, v in entries[name].items() if k == "clip_len"}
            entries[name] = graph_entry(path, **keep, quantized=quantize)
            done.append(name)
    finally:
        root.removeFilter(drop)
    return {"mode": quantize, **s, "graphs": done, "onnxruntime_version": ort.__version__}


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
            "adapters": _adapter_kinds(model),
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


def export_onnx(
    run_or_model,
    out: str | Path,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    propagation: bool = True,
    quantize: str | None = None,
) -> Path:
    """Export a run folder (or a `SAMed2Model`) into the folder `out` (module docstring).

    Args:
        run_or_model: a run folder written by `samed2 train` (model.json + model.safetensors),
            or a model in memory (left unchanged: a merged copy is traced).
        out: the export folder; it must not exist, be empty, or (with `overwrite`) hold an
            earlier export.
        image_size: input side S in px (a multiple of 32, >= 64); None: the model's own.
        opset: ONNX opset, `OPSETS` range.
        overwrite: replace an earlier export in `out` (never anything else).
        propagation: add volume propagation's memory graphs (when that module exists).
        quantize: "int8": the image encoder(s) quantised dynamically to int8 after export
            (`quantize_encoders`; needs onnxruntime); None: fp32 graphs. On test-tiny (HC18) it
            changed box-prompt Dice by -0.001 (docs/deploy.md), so it is not the default.

    Returns the export folder. Errors: ValueError / FileNotFoundError naming the input and the
    fix; ImportError when onnx is missing (`pip install "samed2-kit[export]"`).
    """
    from samed2_kit.model.build import check_image_size
    from samed2_kit.utils.atomic import atomic_path, write_text

    require("onnx")
    check_opset(opset)
    check_quantize(quantize)
    if quantize is not None:
        require("onnxruntime")
    if image_size is not None:
        check_image_size(image_size, "image_size")
    out = check_out(out, overwrite)
    model, run = load_for_export(run_or_model)
    trained_size = int(model.image_size)
    if image_size is not None and image_size != model.image_size:
        model = at_image_size(model, image_size)
    traced = prepared(model)
    with atomic_path(out, directory=True) as tmp:
        entries, plan = export_graphs(traced, tmp, opset)
        if propagation:
            entries.update(propagation_graphs(traced, tmp, traced.image_size, opset))
        quantization = quantize_encoders(tmp, entries, quantize) if quantize else None
        meta = manifest(model, entries, plan, run, opset, trained_size, quantization)
        write_text(tmp / MANIFEST, json.dumps(meta, indent=2) + "\n")
    log.info("exported %s graphs to %s", ", ".join(entries), out)
    return out
