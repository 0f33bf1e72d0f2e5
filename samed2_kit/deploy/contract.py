"""What an export folder is, shared by the exporter and the runtime (no torch, no onnx here):
the manifest's format, the graph names and files, the graphs' input and output names (shapes
in `samed2_kit.deploy.graphs`), and the fixes error messages name."""

from __future__ import annotations

FORMAT = "samed2-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

ENCODER = "image_encoder"  # file: image_encoder.onnx
CLIP_ENCODER = "image_encoder_clip"  # models with temporal adapters and clip_len T > 1
DECODER = "prompt_decoder"

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embed", "high_res_0", "high_res_1", "pos")
DECODER_INPUTS = ("image_embed", "high_res_0", "high_res_1", "point_coords", "point_labels",
                  "mask_input", "has_mask_input")  # fmt: skip
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions", "object_score_logits", "mask_tokens")
FEATURES = DECODER_INPUTS[:3]  # the encoder outputs the decoder reads

FORMATS = ("onnx",)  # `samed2 export --format`
DEFAULT_OPSET = 17
OPSETS = (14, 20)  # the graphs' needs (LayerNorm, Resize) .. torch's TorchScript exporter's max
QUANTIZE = ("int8",)  # `samed2 export --quantize`: the image encoder(s), dynamic int8 (export.py)

REEXPORT_FIX = "re-export with `samed2 export RUN --out DIR`"
INSTALL_FIX = 'pip install "samed2-kit[export]" (in a clone: pip install -e ".[export]")'


def require(module: str):
    """Import `module` (onnx, onnxruntime), or an ImportError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not installed ({e}): {INSTALL_FIX}") from e


def is_export_dir(path) -> bool:
    """Whether `path` is a folder holding an export manifest (of any version); only the
    manifest is read (no torch, no onnxruntime)."""
    import json
    from pathlib import Path

    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT
