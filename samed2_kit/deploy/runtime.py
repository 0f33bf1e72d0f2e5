"""`OnnxModel`: an export folder's graphs through onnxruntime, numpy in and numpy out.

    onnx = OnnxModel("runs/a-onnx")                    # checks the manifest and every digest
    feats = onnx.encode(image)                         # (T, 3, S, S) float32, normalised
    low, iou, obj = onnx.predict_low_res(feats, box=np.array([40, 50, 200, 180.0]),
                                         multimask_output=False)

Inputs are in model space: images preprocessed as `manifest["preprocessing"]` says (what
`Predictor.set_image` does), points and boxes in model-input pixels (0..S). `Predictor(export_dir,
backend="onnx")` wraps this with the torch Predictor's preprocessing and postprocessing.

The decoder graph returns all four masks (`samed2_kit.deploy.graphs`); `select_masks` picks the
three multimask outputs, or the single mask with sam2's fallback to the best multimask output
when the single mask is unstable (`dynamic_multimask_via_stability`), in numpy, with sam2's
arithmetic (float32 areas, the same thresholds).

Sessions: one `onnxruntime.InferenceSession` per graph, made on first use; graph optimisation
level ALL; `threads` intra-op threads (None: onnxruntime's default, one per physical core);
`providers` as onnxruntime takes them (default CPU). onnxruntime is imported when an
`OnnxModel` is made: without it, an ImportError names the extra to install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from samed2_kit.deploy.contract import (
    CLIP_ENCODER,
    DECODER,
    DECODER_OUTPUTS,
    ENCODER,
    ENCODER_OUTPUTS,
    FEATURES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    REEXPORT_FIX,
    require,
)


def read_export_manifest(folder: str | Path, verify: bool = True) -> dict:
    """The manifest of an export folder, after checking its format and that every graph file it
    lists is present and (with `verify`) has the recorded sha256. Errors name the file and the
    fix (re-export)."""
    from samed2_kit.utils.atomic import sha256_file

    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(f"export folder {folder} does not exist: pass a folder written "
                                "by `samed2 export RUN --out DIR`")  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not an export folder (or the "
                                f"export did not finish); {REEXPORT_FIX}")  # fmt: skip
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable or not valid JSON ({e}): {REEXPORT_FIX}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} is not a samed2 export manifest (format {got!r}, expected "
                         f"{FORMAT!r}): {REEXPORT_FIX}")  # fmt: skip
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this samed2-kit reads "
                         f"{FORMAT_VERSION}: upgrade samed2-kit, or {REEXPORT_FIX} with this "
                         "version")  # fmt: skip
    graphs = meta.get("graphs")
    if not isinstance(graphs, dict) or not {ENCODER, DECODER} <= set(graphs):
        raise ValueError(f"{path} lists no {ENCODER} and {DECODER} graphs: {REEXPORT_FIX}")
    for name, entry in graphs.items():
        if not isinstance(entry, dict) or not entry.get("file"):
            continue
        file = folder / entry["file"]
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing ({name} graph, listed in {path}): "
                                    f"copy the whole export folder, or {REEXPORT_FIX}")  # fmt: skip
        if verify and sha256_file(file) != entry.get("sha256"):
            raise ValueError(
                f"{file} does not match {path} (sha256 differs): it was changed, or comes from "
                f"another export or model; {REEXPORT_FIX}"
            )
    return meta


def prompt_arrays(
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The decoder graph's sparse prompt, laid out as sam2's image predictor lays it out: box
    corners (x0, y0) labelled 2 and (x1, y1) labelled 3 first, then the clicks, then one padding
    point (0, 0) labelled -1 whenever there is any point or box (sam2's prompt encoder pads
    points when no box tensor is given; box corners always come as points here).

    Args: points (N, 2) x, y and labels (N,) 1/0, box (4,) x0, y0, x1, y1, all in model-input
    pixels. Returns point_coords (1, N', 2) and point_labels (1, N') float32 (N' = 0: none).
    """
    coords, labs = [], []
    if box is not None:
        coords.append(np.asarray(box, np.float32).reshape(2, 2))
        labs.append(np.array([2, 3], np.float32))
    if points is not None:
        coords.append(np.asarray(points, np.float32).reshape(-1, 2))
        labs.append(np.asarray(labels, np.float32).reshape(-1))
    if coords:
        coords.append(np.zeros((1, 2), np.float32))
        labs.append(np.array([-1], np.float32))
    xy = np.concatenate(coords) if coords else np.zeros((0, 2), np.float32)
    lab = np.concatenate(labs) if labs else np.zeros((0,), np.float32)
    return xy[None], lab[None]


def stability_scores(logits: np.ndarray, delta: float) -> np.ndarray:
    """sam2's stability score of mask logits (..., h, w): area(logits > delta) /
    area(logits > -delta) in float32, 1 where the second area is 0."""
    flat = logits.reshape(*logits.shape[:-2], -1)
    inter = (flat > delta).sum(-1).astype(np.float32)
    union = (flat > -delta).sum(-1).astype(np.float32)
    safe = np.where(union > 0, union, np.float32(1))
    return np.where(union > 0, inter / safe, np.float32(1)).astype(np.float32)


def select_masks(
    low_res: np.ndarray, iou: np.ndarray, multimask_output: bool, settings: dict
) -> tuple[np.ndarray, np.ndarray]:
    """From all four outputs (B, 4, h, w) / (B, 4): the three multimask ones, or the single mask
    (B, 1, h, w) / (B, 1), replaced by the best multimask output (by predicted IoU) where its
    stability score is below the threshold, as sam2's mask decoder does in eval mode.
    `settings`: the manifest's `decoder` entry."""
    lo, hi = settings["multimask"]
    if multimask_output:
        return low_res[:, lo:hi], iou[:, lo:hi]
    k = settings["single_mask"]
    single, single_iou = low_res[:, k : k + 1], iou[:, k : k + 1]
    if not settings["dynamic_multimask_via_stability"]:
        return single, single_iou
    best = np.argmax(iou[:, lo:hi], axis=-1)
    rows = np.arange(len(best))
    best_logits = low_res[:, lo:hi][rows, best][:, None]
    best_iou = iou[:, lo:hi][rows, best][:, None]
    score = stability_scores(single, settings["stability_delta"])  # (B, 1)
    stable = score >= np.float32(settings["stability_thresh"])
    return (np.where(stable[..., None, None], single, best_logits),
            np.where(stable, single_iou, best_iou))  # fmt: skip


def model_input(image01: np.ndarray, preprocessing: dict) -> np.ndarray:
    """An image in [0, 1] as the encoder's input, without torch: (H, W) grey or (H, W, 3) float
    -> (1, 3, S, S) float32, resized to S x S (bilinear with antialiasing: PIL's, which torch's
    `antialias=True` reproduces; within 3e-7 of `medbank.preprocess.to_model_input`), then
    (x - mean) / std per channel. `preprocessing`: the manifest's entry (image_size, mean, std).
    Map intensities to [0, 1] first (`medbank.preprocess.normalize_intensity`, torch-free)."""
    from PIL import Image

    x = np.asarray(image01, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 3):
        raise ValueError(f"model_input: expected an (H, W) or (H, W, 3) image in [0, 1], got "
                         f"shape {x.shape}; map intensities with normalize_intensity first")  # fmt: skip
    s = int(preprocessing["image_size"])
    chans = [x[..., c] for c in range(x.shape[2])]
    if x.shape[:2] != (s, s):
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(c), mode="F").resize(
            (s, s), Image.BILINEAR)) for c in chans]  # fmt: skip
    out = np.stack(chans * (3 // len(chans)))  # grey -> 3 channels
    mean = np.asarray(preprocessing["mean"], np.float32)[:, None, None]
    std = np.asarray(preprocessing["std"], np.float32)[:, None, None]
    return ((out - mean) / std).astype(np.float32)[None]


def _bilinear_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and weights w0, w1 (float32) of one axis resized n_in -> n_out,
    bilinear with align_corners=False, as torch computes them: float32 scale n_in / n_out, source
    (dst + 0.5) * scale - 0.5 rounded once (torch's fused multiply-add; two roundings put the
    weights of far pixels ~1e-5 off), floored at 0."""
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def upsample_logits(low: np.ndarray, height: int, width: int) -> np.ndarray:
    """Low-res logits (..., h, w) -> (..., height, width) float32, bilinear with
    align_corners=False and no antialiasing, without torch: what the Predictor does with
    `F.interpolate` (tested equal to 1e-5); threshold at 0 for the mask."""
    x = np.asarray(low, np.float32)
    h0, h1, hw0, hw1 = _bilinear_axis(x.shape[-2], int(height))
    w0, w1, ww0, ww1 = _bilinear_axis(x.shape[-1], int(width))
    cols = x[..., w0] * ww0 + x[..., w1] * ww1  # (..., h, width)
    return (cols[..., h0, :] * hw0[:, None] + cols[..., h1, :] * hw1[:, None]).astype(np.float32)


class OnnxModel:
    """The graphs of an export folder (module docstring). `manifest`: its manifest.json."""

    def __init__(
        self,
        export_dir: str | Path,
        providers=("CPUExecutionProvider",),
        threads: int | None = None,
        verify: bool = True,
    ):
        self._ort = require("onnxruntime")
        self.folder = Path(export_dir)
        self.manifest = read_export_manifest(self.folder, verify)
        self.providers = list(providers)
        self.threads = threads
        self._sessions: dict[str, object] = {}

    @property
    def spec(self) -> dict:
        """The model spec it was exported from: variant, image_size (the exported size),
        clip_len."""
        return dict(self.manifest["spec"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["preprocessing"]["image_size"])

    @property
    def clip_len(self) -> int:
        """T slices the clip encoder takes (1 when there is none: a 2D model, or a model
        without temporal adapters)."""
        clip = self.manifest["graphs"].get(CLIP_ENCODER)
        return int(clip["clip_len"]) if clip else 1

    @property
    def graphs(self) -> list[str]:
        return sorted(self.manifest["graphs"])

    def session(self, name: str):
        """The onnxruntime session of graph `name` (made on first use)."""
        if name not in self._sessions:
            entry = self.manifest["graphs"].get(name)
            if entry is None:
                raise ValueError(f"{self.folder} has no {name!r} graph (it has {self.graphs})")
            ort = self._ort
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = int(self.threads or 0)
            opts.log_severity_level = 3  # errors only (shape-merge notes are noise)
            path = str(self.folder / entry["file"])
            self._sessions[name] = ort.InferenceSession(path, opts, providers=self.providers)
        return self._sessions[name]

    def encode(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Features of the centre slice of `image` (T, 3, S, S) float32 (T = 1, or `clip_len`
        for the clip encoder): {image_embed (1, C, S/16, S/16), high_res_0, high_res_1, pos}."""
        x = np.ascontiguousarray(image, dtype=np.float32)
        s = self.image_size
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"encode: expected a (T, 3, {s}, {s}) image, got {x.shape}: "
                             "preprocess to the exported image size")  # fmt: skip
        t = x.shape[0]
        if t == 1:
            name = ENCODER
        elif t == self.clip_len:
            name = CLIP_ENCODER
        else:
            raise ValueError(f"encode: {t} slices; this export takes 1 slice or clips of "
                             f"{self.clip_len}")  # fmt: skip
        out = self.session(name).run(list(ENCODER_OUTPUTS), {"image": x})
        return dict(zip(ENCODER_OUTPUTS, out, strict=True))

    def decode(
        self,
        features: dict[str, np.ndarray],
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        mask_input: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The decoder graph on one object: point_coords (1, N, 2), point_labels (1, N) as
        `prompt_arrays` lays them out; mask_input (1, 1, S/4, S/4) logits or None. Returns
        {low_res_masks (1, 4, S/4, S/4) all four masks' logits, iou_predictions (1, 4),
        object_score_logits (1, 1), mask_tokens (1, 4, C)}."""
        low = self.image_size // 4
        has = mask_input is not None
        mask = (np.asarray(mask_input, np.float32).reshape(1, 1, low, low) if has
                else np.zeros((1, 1, low, low), np.float32))  # fmt: skip
        feed = {k: features[k] for k in FEATURES}
        feed |= {
            "point_coords": np.asarray(point_coords, np.float32).reshape(1, -1, 2),
            "point_labels": np.asarray(point_labels, np.float32).reshape(1, -1),
            "mask_input": mask,
            "has_mask_input": np.array([1.0 if has else 0.0], np.float32),
        }
        out = self.session(DECODER).run(list(DECODER_OUTPUTS), feed)
        return dict(zip(DECODER_OUTPUTS, out, strict=True))

    def predict_low_res(
        self,
        features: dict[str, np.ndarray],
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One object's masks from prompts in model-input pixels (points (N, 2) + labels (N,),
        box (4,), mask_input (S/4, S/4) logits): low-res logits (M, S/4, S/4), IoU (M,), object
        score logits (1,); M = 3 with `multimask_output`, else 1."""
        if labels is None and points is not None:
            labels = np.ones(len(np.asarray(points).reshape(-1, 2)), np.float32)
        coords, labs = prompt_arrays(points, labels, box)
        out = self.decode(features, coords, labs, mask_input)
        masks, iou = select_masks(out["low_res_masks"], out["iou_predictions"], multimask_output,
                                  self.manifest["decoder"])  # fmt: skip
        return masks[0], iou[0], out["object_score_logits"][0]
