"""What an export folder is, shared by the exporter and the runtime (no torch, no onnx here):
the manifest's format, the graph names and files, the graphs' input and output names (shapes
in `samed2_kit.deploy.graphs`), and the fixes error messages name."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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

# propagation (deploy.propagation runs it, deploy.propagation_torch exports it)
META_KEY = "samed2.propagation"  # metadata key of memory_encoder.onnx / memory_attention.onnx
RESULT_KEYS = ("raw_logits", "low_res_logits", "iou", "object_score_logits", "memory", "pointer")

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


class ImagePath:
    """The image half of the ONNX path as `OnnxPropagation` calls it (numpy in, numpy out). Any
    object with these two methods will do (`TorchImagePath`: the torch model's; the default,
    `OnnxModelImagePath`: the export folder's image_encoder.onnx and prompt_decoder.onnx).

    encode(images (B, 3, S, S) float32 ImageNet-normalised, clip_len T) -> {"image_embed":
        (B, C, h, w) with `no_mem_embed` added, "high_res_0": (B, C/8, 4h, 4w), "high_res_1":
        (B, C/4, 2h, 2w), "pos": (B, C, h, w)}: `SAMed2Model.encode` (B = clips * T).
    decode(feats (those four keys; image_embed possibly memory-conditioned), points (B, N, 2)
        float32 in model-input pixels or None, labels (B, N) int64 (1 / 0 clicks, -1 padding,
        2 / 3 box corners, placed first; sam2's own padding point is the decoder's to add, as
        sam2's prompt encoder adds it) or None, mask_input (B, 1, S/4, S/4) float32 logits or
        None) -> {"low_res_logits": (B, 1, S/4, S/4), "iou": (B, 1), "object_score_logits":
        (B, 1), "mask_tokens": (B, M, C)}: `SAMed2Model.decode(feats, Prompts(points, labels,
        masks=mask_input), multimask_output=False, use_memory=False)` (single mask, with sam2's
        fallback to the best of three when unstable; the tokens the object pointer is made of).
    """

    FEATURES = ("image_embed", "high_res_0", "high_res_1", "pos")
    DECODED = ("low_res_logits", "iou", "object_score_logits", "mask_tokens")

    def encode(self, images: np.ndarray, clip_len: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, feats: dict, points, labels, mask_input) -> dict[str, np.ndarray]:
        raise NotImplementedError
