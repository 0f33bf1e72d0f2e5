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
    MANIFEST,
    OPSETS,
    is_export_dir,
    require,
)
from samed2_kit.deploy.describe import adapter_kinds, graph_entry, manifest
from samed2_kit.deploy.quantize import QUANT_SETTINGS, check_quantize, quantize_encoders

__all__ = ["QUANT_SETTINGS", "check_opset", "check_quantize", "export_onnx", "graph_entry"]
log = logging.getLogger(__name__)

PROPAGATION_MODULE = "samed2_kit.deploy.propagation"


def check_opset(opset, what: str = "opset") -> int:
    """`opset` if the exporter and the graphs support it, else a ValueError naming `what`."""
    lo, hi = OPSETS
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        raise ValueError(f"{what}={opset!r}: use an ONNX opset from {lo} to {hi} (default "
                         f"{DEFAULT_OPSET})")  # fmt: skip
    return opset


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
        if t > 1 and "temporal" in adapter_kinds(model):
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
