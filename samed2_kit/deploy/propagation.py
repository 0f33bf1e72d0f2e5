"""ONNX graphs of SAM 2's video path for volume propagation, and an onnxruntime runner.

    entries = export_propagation(model, folder, image_size=256, opset=17)  # two graphs
    masks = propagate_volume(None, volume, {40: Prompt(box=...)}, backend="onnx",
                             export_dir=folder)                        # (Z, H, W) bool

Shapes: B images (one object each), C the hidden width, m the memory width, h = w = S/16 the
embedding grid of an S x S model input; n memory entries, P object pointers (n >= 1, P >= 0).

memory_encoder.onnx (`MemoryEncoderGraph`): what a decoded slice leaves for the next ones
    in   image_embed (B, C, h, w) float32       the encoder's embedding, `no_mem_embed` added
                                                (`ImageFeatures.image_embed`)
         mask_logits (B, 1, S/4, S/4) float32   the slice's logits (-1024 where "no object")
         object_score_logits (B, 1) float32
         mask_tokens (B, M, C) float32          the decoder's output tokens (M = 1: one mask)
         iou (B, M) float32                     its predicted IoU (picks the token when M > 1)
    out  memory (B, m, h, w) float32            `_sam2.encode_memory`
         object_pointer (B, C) float32          `_sam2.object_pointer`

memory_attention.onnx (`MemoryAttentionGraph`): a slice's embedding conditioned on memories
    in   image_embed (B, C, h, w) float32       as above
         image_pos (B, C, h, w) float32         `ImageFeatures.pos`
         memory (B, n, m, h, w) float32         entries, newest first, the prompted slice last
         memory_slots (n,) int64                each entry's temporal encoding
                                                (`_sam2.frame_slots`)
         pointers (P, B, C) float32             object pointers (`sequence.Pass.context`)
         pointer_positions (P,) float32         their relative positions
                                                (`_sam2.pointer_positions`)
    out  conditioned (B, C, h, w) float32       `_sam2.attend_memory`: the decoder's embedding

Inside, the memory tokens, the memory positional encoding (a constant of the grid), the temporal
encodings and the pointer tokens are assembled exactly as `_sam2.attend_memory` does, and sam2's
complex rotary attention runs in its real-valued form (`_sam2.attend_tokens`). An input a model
does not use (pointers without `use_obj_ptrs_in_encoder`) is left out of the graph; the runner
feeds only the inputs a graph has. Both graphs carry the numbers the runner needs as ONNX
metadata, key "samed2.propagation" (JSON: `propagation_config`).

The image path (encoder, prompt decoder: `samed2_kit.deploy.graphs`) is another graph pair;
`OnnxPropagation` reaches it through the small interface `ImagePath` documents
(`OnnxModelImagePath`: through `samed2_kit.deploy.runtime.OnnxModel`).

This module imports without torch: the runner is numpy + onnxruntime, and
`OnnxPropagation.propagate_slices` propagates a box or clicks through a volume's slices with
numpy arrays only (what docs/examples/onnx_numpy.py runs). The torch side (the graphs as torch
modules, `export_propagation`, `TorchImagePath`, and `OnnxPropagation`'s torch-facing steps for
`propagate_volume`) is in `samed2_kit.deploy.propagation_torch`, imported on first use; its names
are also reachable here (`propagation.export_propagation`, ...).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from samed2_kit.deploy.contract import DEFAULT_OPSET, META_KEY, RESULT_KEYS, ImagePath  # noqa: F401

GRAPHS = ("memory_encoder", "memory_attention")
NO_OBJECT_LOGIT = -1024.0  # sam2's NO_OBJ_SCORE (= volume.sequence.NO_OBJECT_LOGIT)
DIRECTIONS = ("both", "up", "down", "none")  # as propagate_volume's

# names defined in propagation_torch (torch), reachable from here on first use
_TORCH_NAMES = ("MemoryEncoderGraph", "MemoryAttentionGraph", "TorchImagePath",
                "export_propagation", "propagation_config")  # fmt: skip


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from samed2_kit.deploy import propagation_torch

        return getattr(propagation_torch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def frame_slots(num_maskmem: int, recent: int) -> list[int]:
    """Temporal-encoding slots of `recent` earlier results (most recent first: d steps back gets
    d - 1, at most num_maskmem - 2) then of the prompted slice (num_maskmem - 1): sam2's rule,
    `_sam2.frame_slots` without torch."""
    top = int(num_maskmem) - 1
    return [min(r, top - 1) for r in range(recent)] + [top]


def pointer_positions(max_obj_ptrs: int, distances: list[int], num_frames: int) -> np.ndarray:
    """Relative positions (P,) float32 of object pointers `distances` slices away in a sequence of
    `num_frames`: distance / max(min(num_frames, max_obj_ptrs) - 1, 1) (`_sam2.pointer_positions`
    without torch)."""
    t_max = max(min(int(num_frames), int(max_obj_ptrs)) - 1, 1)
    return np.asarray(distances, np.float32).reshape(-1) / np.float32(t_max)


class OnnxModelImagePath(ImagePath):
    """`ImagePath` on an export folder's image_encoder.onnx and prompt_decoder.onnx through
    `samed2_kit.deploy.runtime.OnnxModel` (one image per graph call): the decoder's four outputs
    reduced to the single mask with sam2's unstable-mask fallback (`runtime.select_masks`), the
    padding point appended whenever a point is given (sam2's prompt encoder does), and token 0
    as the object pointer's (sam2's single-mask token). Its encoder takes one slice (T = 1)."""

    def __init__(self, onnx_model):
        self.model = onnx_model

    def encode(self, images: np.ndarray, clip_len: int) -> dict[str, np.ndarray]:
        if clip_len != 1:
            raise ValueError(
                f"the ONNX image encoder gives one slice's features, not a clip of {clip_len} "
                "encoded together: pass clip_len=1 (the torch backend gives the same then)"
            )
        rows = [self.model.encode(images[i : i + 1]) for i in range(len(images))]
        return {k: np.concatenate([r[k] for r in rows]) for k in self.FEATURES}

    def decode(self, feats: dict, points, labels, mask_input) -> dict[str, np.ndarray]:
        from samed2_kit.deploy.runtime import select_masks

        rows = []
        for i in range(len(feats["image_embed"])):
            one = {k: v[i : i + 1] for k, v in feats.items()}
            xy, lab = np.zeros((1, 0, 2), np.float32), np.zeros((1, 0), np.float32)
            if points is not None:  # + sam2's padding point (its prompt encoder adds one)
                xy = np.concatenate([points[i : i + 1], np.zeros((1, 1, 2), np.float32)], 1)
                lab = np.concatenate([labels[i : i + 1], -np.ones((1, 1))], 1)
            mask = None if mask_input is None else mask_input[i : i + 1]
            out = self.model.decode(one, xy.astype(np.float32), lab.astype(np.float32), mask)
            low, iou = select_masks(out["low_res_masks"], out["iou_predictions"], False,
                                    self.model.manifest["decoder"])  # fmt: skip
            rows.append((low, iou, out["object_score_logits"], out["mask_tokens"][:, :1]))
        columns = zip(*rows, strict=True)
        return {k: np.concatenate(v) for k, v in zip(self.DECODED, columns, strict=True)}


class OnnxPropagation:
    """Volume propagation's steps on onnxruntime: the two memory graphs of an export folder and
    an `ImagePath` (default: the folder's image graphs through `runtime.OnnxModel`).
    `propagate_volume(runner, ..., backend="onnx")` takes one; it does what the torch backend's
    `volume.sequence` steps do.

    entries: {graph name: manifest entry} (`export_propagation`'s return value); None: the
    manifest's "graphs" (manifest.json of `export_dir`), else the default file names. A given
    sha256 is checked. providers: onnxruntime's (default CPU).
    """

    def __init__(self, export_dir, entries: dict | None = None, image_path=None,
                 providers=None):  # fmt: skip
        folder = Path(export_dir)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ONNX export folder {folder} not found: write one with `samed2 export RUN "
                "--out DIR` (or `export_propagation`) and pass its path"
            )
        if image_path is None:
            from samed2_kit.deploy.runtime import OnnxModel

            onnx_model = OnnxModel(folder, providers=providers or ("CPUExecutionProvider",))
            image_path = OnnxModelImagePath(onnx_model)
            entries = onnx_model.manifest["graphs"] if entries is None else entries
        entries = _manifest_entries(folder) if entries is None else entries
        self.sessions = {}
        for name in GRAPHS:
            entry = entries.get(name, {"file": f"{name}.onnx"})
            path = folder / entry["file"]
            if "sha256" in entry and path.is_file():
                got = hashlib.sha256(path.read_bytes()).hexdigest()
                if got != entry["sha256"]:
                    raise ValueError(
                        f"{path}: sha256 {got} differs from the manifest's {entry['sha256']}: "
                        "the file was changed after export; export the model again"
                    )
            self.sessions[name] = _session(path, providers)
        meta = self.sessions["memory_attention"].get_modelmeta().custom_metadata_map
        if META_KEY not in meta:
            raise ValueError(
                f"{folder / 'memory_attention.onnx'} has no {META_KEY!r} metadata: it was not "
                "written by export_propagation; export the model again"
            )
        self.config = json.loads(meta[META_KEY])
        self.image_size = int(self.config["image_size"])
        self.clip_len = int(self.config["clip_len"])
        self.num_maskmem = int(self.config["num_maskmem"])
        self.max_obj_ptrs = int(self.config["max_obj_ptrs_in_encoder"])
        self.image_path = image_path

    @property
    def device(self):
        """torch.device("cpu"): where `propagate_volume` puts the tensors it hands the steps."""
        import torch

        return torch.device("cpu")

    # graphs, numpy in and out
    def encode_memory(self, image_embed, mask_logits, object_score_logits, mask_tokens, iou):
        """memory_encoder.onnx: -> (memory (B, m, h, w), object_pointer (B, C))."""
        feed = {"image_embed": image_embed, "mask_logits": mask_logits,
                "object_score_logits": object_score_logits, "mask_tokens": mask_tokens,
                "iou": iou}  # fmt: skip
        return tuple(_run(self.sessions["memory_encoder"], feed, "memory_encoder.onnx"))

    def attend(self, image_embed, image_pos, memory, memory_slots, pointers, pointer_positions):
        """memory_attention.onnx: -> conditioned (B, C, h, w)."""
        feed = {"image_embed": image_embed, "image_pos": image_pos, "memory": memory,
                "memory_slots": np.asarray(memory_slots, np.int64), "pointers": pointers,
                "pointer_positions": np.asarray(pointer_positions, np.float32)}  # fmt: skip
        return _run(self.sessions["memory_attention"], feed, "memory_attention.onnx")[0]

    # one slice, numpy in and out ({RESULT_KEYS}: see `slice_arrays`)
    def prompted_arrays(self, feats: dict, points, labels, mask_input) -> dict:
        """A prompted slice: the decoder on `feats` (`ImagePath.FEATURES`, one image) with
        points (1, N, 2) float32 in model-input pixels and labels (1, N) int64 (box corners 2 / 3
        first, then clicks; no padding point: the decoder adds it), or None, and mask_input
        (1, 1, S/4, S/4) logits or None; then its memory features and object pointer
        (`volume.sequence.prompted` without corrective rounds). Returns `slice_arrays`."""
        res = self.image_path.decode(feats, points, labels, mask_input)
        low, obj = res["low_res_logits"], res["object_score_logits"]
        memory, pointer = self.encode_memory(feats["image_embed"], low, obj, res["mask_tokens"],
                                             res["iou"])  # fmt: skip
        return slice_arrays(low, low, res["iou"], obj, memory, pointer)

    def from_mask_arrays(self, feats: dict, low: np.ndarray, obj: np.ndarray) -> dict:
        """A slice whose result is given: logits `low` (1, 1, S/4, S/4), object score `obj`
        (1, 1); the decoder runs on the mask only for the object pointer."""
        res = self.image_path.decode(feats, None, None, low)
        memory, pointer = self.encode_memory(feats["image_embed"], low, obj, res["mask_tokens"],
                                             res["iou"])  # fmt: skip
        return slice_arrays(low, low, res["iou"], obj, memory, pointer)

    def propagated_arrays(self, feats: dict, memory: np.ndarray | None = None,
                          pointers: np.ndarray | None = None,
                          positions: np.ndarray | None = None) -> dict:  # fmt: skip
        """An unprompted slice (`volume.sequence.propagated`, one image): its embedding
        conditioned by memory attention on `memory` (n, m, h, w), newest first with the prompted
        slice's last (None: no memory, the embedding as is), and object `pointers` (P, 1, C) at
        relative `positions` (P,) (`pointer_positions`; None: none); decoded with sam2's padding
        point as the only prompt; logits set to NO_OBJECT_LOGIT where the object score <= 0,
        the memory made of those. Returns `slice_arrays`."""
        embed = feats["image_embed"]
        cond = embed
        if memory is not None:
            slots = frame_slots(self.num_maskmem, len(memory) - 1)
            c = embed.shape[1]
            ptr, rel = np.zeros((0, 1, c), np.float32), np.zeros((0,), np.float32)
            if pointers is not None:
                ptr, rel = np.asarray(pointers, np.float32), np.asarray(positions, np.float32)
            memory = np.ascontiguousarray(memory, dtype=np.float32)[None]
            cond = self.attend(embed, feats["pos"], memory, slots, ptr, rel)
        pad = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.int64)  # sam2's padding point
        res = self.image_path.decode({**feats, "image_embed": cond}, *pad, None)
        raw, obj = res["low_res_logits"], res["object_score_logits"]
        low = np.where(obj[..., None, None] > 0, raw, np.float32(NO_OBJECT_LOGIT))
        low = low.astype(np.float32)
        mem, pointer = self.encode_memory(embed, low, obj, res["mask_tokens"], res["iou"])
        return slice_arrays(raw, low, res["iou"], obj, mem, pointer)

    # a whole volume, numpy only
    def propagate_slices(self, image, num_slices: int, start: int, *, box=None, points=None,
                         labels=None, direction: str = "both",
                         memory_frames: int = 6) -> np.ndarray:  # fmt: skip
        """Segment one object through `num_slices` slices from a box and/or clicks on slice
        `start`, with numpy and onnxruntime only (no torch): what `propagate_volume(...,
        backend="onnx")` does for one prompted slice, slice by slice (tested to give the same
        logits).

        Args:
            image: image(z) -> slice z as the encoder's input, (3, S, S) or (1, 3, S, S) float32
                ImageNet-normalised (manifest["preprocessing"]; `runtime.model_input`); called
                once per visited slice.
            num_slices: Z. start: the prompted slice, 0 <= start < Z.
            box: (4,) x0, y0, x1, y1 and/or points (N, 2) x, y with labels (N,) 1 / 0 (default
                all 1), in model-input pixels (0..S).
            direction: "both", "up" (towards higher z), "down", or "none" (the prompted slice
                only). memory_frames: recent results each slice attends to besides the prompted
                slice's (0: none, and no object pointers).

        Returns:
            (Z, S/4, S/4) float32 low-res logits: the prompted slice's, each propagated slice's
            (NO_OBJECT_LOGIT where the object score says "absent"), NO_OBJECT_LOGIT on slices
            not visited. Upsample to the slice size and threshold at 0 (`runtime.upsample_logits`).
        """
        n, start = int(num_slices), int(start)
        if direction not in DIRECTIONS:
            raise ValueError(f"propagate_slices: direction={direction!r}: one of {DIRECTIONS}")
        if not 0 <= start < n:
            raise ValueError(f"propagate_slices: start={start} is not in 0..{n - 1} "
                             f"(num_slices={n})")  # fmt: skip
        if isinstance(memory_frames, bool) or not isinstance(memory_frames, int | np.integer) or \
                memory_frames < 0:  # fmt: skip
            raise ValueError(f"propagate_slices: memory_frames={memory_frames!r}: give an "
                             "integer >= 0")  # fmt: skip
        coords, labs = _prompt_points(box, points, labels)
        low = self.image_size // 4
        out = np.full((n, low, low), np.float32(NO_OBJECT_LOGIT), np.float32)

        def feats(z: int) -> dict:
            x = np.asarray(image(z), np.float32).reshape(1, 3, self.image_size, self.image_size)
            return self.image_path.encode(x, 1)

        first = self.prompted_arrays(feats(start), coords, labs, None)
        out[start] = first["low_res_logits"][0, 0]
        passes = []
        if direction in ("both", "up"):
            passes.append(range(start + 1, n))
        if direction in ("both", "down"):
            passes.append(range(start - 1, -1, -1))
        limit = min(n, self.max_obj_ptrs) - 1  # as sequence.Pass.begin
        for zs in passes:
            mems, ptrs, seen = [], [], 0  # newest first, as sequence.Pass
            for z in zs:
                given = {}
                if memory_frames:
                    distances = [seen + 1, *range(1, len(ptrs) + 1)]
                    given = {"memory": np.stack([*mems, first["memory"][0]]),
                             "pointers": np.stack([first["pointer"], *ptrs]),
                             "positions": pointer_positions(self.max_obj_ptrs, distances, n)}  # fmt: skip
                res = self.propagated_arrays(feats(z), **given)
                out[z] = res["low_res_logits"][0, 0]
                mems = [res["memory"][0], *mems][:memory_frames]
                ptrs = [res["pointer"], *ptrs][:limit]
                seen += 1
        return out

    # the steps of `propagate_volume` (torch tensors in and out, as `volume.sequence`'s)
    def encode(self, images, clip_len: int):
        from samed2_kit.deploy.propagation_torch import as_array, features_of

        return features_of(self.image_path.encode(as_array(images), clip_len))

    def prompted(self, feats, prompts):
        """A prompted slice (`volume.sequence.prompted` without corrective rounds)."""
        from samed2_kit.deploy.propagation_torch import (
            as_array,
            feature_arrays,
            prompt_points,
            slice_result,
        )

        coords, labels = prompt_points(prompts)
        masks = None if prompts.masks is None else as_array(prompts.masks)
        return slice_result(self.prompted_arrays(feature_arrays(feats), coords, labels, masks))

    def from_mask(self, feats, low, obj):
        """A slice whose result is given as logits `low` (B, 1, S/4, S/4) and object score
        `obj` (B, 1) tensors (`from_mask_arrays`)."""
        from samed2_kit.deploy.propagation_torch import as_array, feature_arrays, slice_result

        arrays = self.from_mask_arrays(feature_arrays(feats), as_array(low), as_array(obj))
        return slice_result(arrays)

    def propagated(self, feats, memory, pointers):
        """An unprompted slice (`volume.sequence.propagated`, one image): memory (n, m, h, w)
        newest first, the prompted slice's last, or None; pointers ((P, 1, C), distances,
        sequence length) or None (`sequence.Pass.context`)."""
        from samed2_kit.deploy.propagation_torch import as_array, feature_arrays, slice_result

        given = {}
        if memory is not None:
            given["memory"] = as_array(memory)
            if pointers is not None:
                ptr, distances, num_frames = pointers
                given["pointers"] = as_array(ptr)
                given["positions"] = pointer_positions(self.max_obj_ptrs, distances, num_frames)
        return slice_result(self.propagated_arrays(feature_arrays(feats), **given))


def slice_arrays(raw, low, iou, obj, memory, pointer) -> dict[str, np.ndarray]:
    """One slice's result as numpy arrays, keyed as `volume.sequence.SliceResult`'s fields
    (`RESULT_KEYS`): raw_logits (B, 1, S/4, S/4) the decoder's; low_res_logits the same, set to
    NO_OBJECT_LOGIT where the object is absent (propagated slices); iou (B, 1);
    object_score_logits (B, 1); memory (B, m, h, w); pointer (B, C)."""
    return dict(zip(RESULT_KEYS, (raw, low, iou, obj, memory, pointer), strict=True))


def _prompt_points(box, points, labels) -> tuple[np.ndarray, np.ndarray]:
    """(points (1, N, 2) float32, labels (1, N) int64): box corners labelled 2 / 3 first, then
    the clicks (`propagation_torch.prompt_points`' layout); ValueError when neither is given."""
    coords, labs = [], []
    if box is not None:
        coords.append(np.asarray(box, np.float32).reshape(2, 2))
        labs.append(np.array([2, 3], np.int64))
    if points is not None:
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        coords.append(pts)
        lab = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels, np.int64)
        if lab.shape != (len(pts),):
            raise ValueError(f"propagate_slices: {len(pts)} points but labels of shape "
                             f"{lab.shape}: give one label (1 / 0) per point")  # fmt: skip
        labs.append(lab)
    if not coords:
        raise ValueError("propagate_slices: give a box=(x0, y0, x1, y1) and/or points=[[x, y]]")
    return np.concatenate(coords)[None], np.concatenate(labs)[None]


def _session(path: Path, providers=None):
    """An onnxruntime session of `path` (CPU unless `providers` says otherwise)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path} not found: the export folder lacks this graph; export the model again "
            "(`samed2 export`)"
        )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def _run(session, given: dict, where: str) -> list[np.ndarray]:
    """Run `session` on the entries of `given` it has inputs for; a missing one raises."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(
            f"{where}: inputs {missing} are not among those the runner gives ({sorted(given)}): "
            "the graph does not follow the export contract; export the model again"
        )
    return session.run(None, {n: given[n] for n in names})


def _manifest_entries(folder: Path) -> dict:
    """{graph name: entry} of the memory graphs in manifest.json of `folder` ("graphs"); {}
    without a manifest."""
    path = folder / "manifest.json"
    if not path.is_file():
        return {}
    try:
        graphs = json.loads(path.read_text()).get("graphs", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a samed2 export manifest ({e}); export the model "
                         "again") from e  # fmt: skip
    return {n: graphs[n] for n in GRAPHS if isinstance(graphs.get(n), dict) and "file" in graphs[n]}
