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
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from samed2_kit.model import _sam2
from samed2_kit.types import ImageFeatures, Prompts

GRAPHS = ("memory_encoder", "memory_attention")
META_KEY = "samed2.propagation"
DEFAULT_OPSET = 17


class MemoryEncoderGraph(nn.Module):
    """sam2's memory encoder and object-pointer projection of a decoded slice, on sam2's own
    weights (I/O: the module docstring)."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.sam = sam

    def forward(self, image_embed, mask_logits, object_score_logits, mask_tokens, iou):
        sam = self.sam
        feats = ImageFeatures(image_embed, [], image_embed)  # encode_memory reads the embedding
        memory = _sam2.encode_memory(sam, feats, mask_logits, object_score_logits)
        best = iou.argmax(dim=-1)[:, None, None].expand(-1, 1, mask_tokens.shape[-1])
        token = torch.gather(mask_tokens, 1, best)[:, 0]  # M = 1: token 0, as object_pointer
        return memory, _sam2.pointer_of_token(sam, token, object_score_logits)


class MemoryAttentionGraph(nn.Module):
    """sam2's memory attention over memory entries and object pointers, assembled as
    `_sam2.attend_memory` assembles them, in real arithmetic (I/O: the module docstring)."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.sam = sam
        side = int(sam.image_size) // int(sam.backbone_stride)
        self.grid = (side, side)
        like = torch.zeros(1, int(sam.mem_dim), side, side)
        pos = _sam2.memory_pos(sam, like).flatten(2).transpose(1, 2)[0]  # (h*w, m)
        self.register_buffer("memory_pos", pos, persistent=False)

    def forward(self, image_embed, image_pos, memory, memory_slots, pointers, pointer_positions):
        sam = self.sam
        b, c, h, w = image_embed.shape
        m = memory.shape[2]
        feats = ImageFeatures(image_embed, [], image_pos)
        # reshapes with -1, not (un)flatten: the ONNX exporter keeps their sizes dynamic
        curr = _sam2.raw_embed(sam, feats).reshape(b, c, -1).transpose(1, 2)  # (B, h*w, C)
        curr_pos = image_pos.reshape(b, c, -1).transpose(1, 2)
        mem = memory.permute(0, 1, 3, 4, 2).reshape(b, -1, m)  # (B, n*h*w, m), entry-major
        tpos = sam.maskmem_tpos_enc[memory_slots].reshape(-1, 1, m)  # (n, 1, m)
        pos = (self.memory_pos.to(mem.dtype)[None] + tpos).reshape(1, -1, m)  # (1, n*h*w, m)
        pos = pos.expand(b, -1, -1)
        extra = extra_pos = None
        if sam.use_obj_ptrs_in_encoder:
            ptr, ptr_pos = _sam2.pointer_tokens_at(sam, pointers, pointer_positions)
            extra, extra_pos = ptr.transpose(0, 1), ptr_pos.transpose(0, 1)  # (B, P', m)
        out = _sam2.attend_tokens(sam, curr, curr_pos, mem, pos, self.grid, extra, extra_pos)
        return out.transpose(1, 2).reshape(b, c, h, w)


def propagation_config(model) -> dict:
    """What the runner needs besides the graphs (written into both graphs' metadata):
    image_size S, clip_len T of the encoder, num_maskmem, max_obj_ptrs_in_encoder, mem_dim,
    hidden_dim C and use_obj_ptrs_in_encoder."""
    sam = getattr(model, "sam", model)
    spec = getattr(model, "spec", None)
    return {
        "image_size": int(sam.image_size),
        "clip_len": int(getattr(spec, "clip_len", 1) or 1),
        "num_maskmem": int(sam.num_maskmem),
        "max_obj_ptrs_in_encoder": int(sam.max_obj_ptrs_in_encoder),
        "mem_dim": int(sam.mem_dim),
        "hidden_dim": int(sam.hidden_dim),
        "use_obj_ptrs_in_encoder": bool(sam.use_obj_ptrs_in_encoder),
    }


def _examples(sam: nn.Module) -> dict[str, tuple]:
    """(example inputs, input names, output names, dynamic axes) of each graph. The example
    sizes differ from each other (B=2, M=3, n=3, P=5) so that none is taken for another."""
    s, c, m = int(sam.image_size), int(sam.hidden_dim), int(sam.mem_dim)
    side = s // int(sam.backbone_stride)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    enc_in = (rnd(2, c, side, side), rnd(2, 1, s // 4, s // 4), rnd(2, 1), rnd(2, 3, c),
              torch.rand(2, 3, generator=g))  # fmt: skip
    slots = torch.tensor([0, 1, int(sam.num_maskmem) - 1])
    att_in = (rnd(2, c, side, side), rnd(2, c, side, side), rnd(2, 3, m, side, side), slots,
              rnd(5, 2, c), torch.rand(5, generator=g))  # fmt: skip
    batch, tokens, n, p = "batch", "tokens", "memories", "pointers"
    enc_axes = {"image_embed": {0: batch}, "mask_logits": {0: batch},
                "object_score_logits": {0: batch}, "mask_tokens": {0: batch, 1: tokens},
                "iou": {0: batch, 1: tokens}, "memory": {0: batch},
                "object_pointer": {0: batch}}  # fmt: skip
    att_axes = {"image_embed": {0: batch}, "image_pos": {0: batch},
                "memory": {0: batch, 1: n}, "memory_slots": {0: n},
                "pointers": {0: p, 1: batch}, "pointer_positions": {0: p},
                "conditioned": {0: batch}}  # fmt: skip
    return {
        "memory_encoder": (
            MemoryEncoderGraph(sam),
            enc_in,
            list(enc_axes)[:5],
            ["memory", "object_pointer"],
            enc_axes,
        ),  # fmt: skip
        "memory_attention": (
            MemoryAttentionGraph(sam),
            att_in,
            list(att_axes)[:6],
            ["conditioned"],
            att_axes,
        ),  # fmt: skip
    }


def _io(values) -> list[dict]:
    """ONNX value infos -> [{"name", "shape" (ints; strings for dynamic axes), "dtype"}]."""
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or int(d.dim_value) for d in t.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


def _static_output_dims(proto, outs, axes: dict) -> None:
    """Write the fixed sizes of the outputs into the graph (the exporter names them as if
    dynamic): every axis not in `axes` takes the example output's size."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    for value, out in zip(proto.graph.output, outs, strict=True):
        dynamic = axes.get(value.name, {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i not in dynamic:
                dim.Clear()
                dim.dim_value = int(out.shape[i])


def export_propagation(model, folder, image_size: int, opset: int = DEFAULT_OPSET) -> dict:
    """Write memory_encoder.onnx and memory_attention.onnx into `folder` (each atomically).

    Args:
        model: a SAMed2Model (or sam2's SAM2Base). folder: the export folder.
        image_size: S, which must be the model's (the graphs hold its grid's constants).
        opset: ONNX opset (>= 14: scaled dot-product attention).

    Returns:
        {graph name: {"file", "sha256", "inputs", "outputs"}}, inputs/outputs as lists of
        {"name", "shape", "dtype"} (dynamic axes named: batch, tokens, memories, pointers).
    """
    import onnx

    from samed2_kit.utils.atomic import atomic_path
    from samed2_kit.utils.modes import evaluation

    sam = getattr(model, "sam", model)
    if int(image_size) != int(sam.image_size):
        raise ValueError(
            f"export_propagation: image_size={image_size} but the model was built for "
            f"{sam.image_size}: export at the model's image size (rebuild the model to change it)"
        )
    if opset < 14:
        raise ValueError(f"export_propagation: opset={opset}; give >= 14 (attention needs it)")
    folder = Path(folder)
    meta = json.dumps(propagation_config(model), sort_keys=True)
    entries = {}
    with evaluation(sam), torch.no_grad():
        for name, (module, args, inputs, outputs, axes) in _examples(sam).items():
            buf = io.BytesIO()
            with (
                warnings.catch_warnings()
            ):  # the TorchScript exporter's deprecation and trace notes
                warnings.simplefilter("ignore")
                torch.onnx.export(module.eval(), args, buf, input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, opset_version=opset,
                                  dynamo=False, do_constant_folding=True)  # fmt: skip
            proto = onnx.load_model_from_string(buf.getvalue())
            _static_output_dims(proto, module(*args), axes)
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_KEY, meta
            data = proto.SerializeToString()
            path = folder / f"{name}.onnx"
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            entries[name] = {
                "file": path.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "inputs": _io(proto.graph.input),
                "outputs": _io(proto.graph.output),
            }
    return entries


# --- the onnxruntime runner -------------------------------------------------------------------


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


class TorchImagePath(ImagePath):
    """`ImagePath` on a torch SAMed2Model (CPU; run in eval mode, its modes restored): the ONNX
    memory graphs with torch's image path."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def encode(self, images: np.ndarray, clip_len: int) -> dict[str, np.ndarray]:
        from samed2_kit.utils.modes import evaluation

        with evaluation(self.model):
            f = self.model.encode(torch.from_numpy(images), clip_len=clip_len)
        return dict(zip(self.FEATURES, (_np(t) for t in (f.image_embed, *f.high_res, f.pos)),
                        strict=True))  # fmt: skip

    @torch.no_grad()
    def decode(self, feats: dict, points, labels, mask_input) -> dict[str, np.ndarray]:
        f = _features(feats)
        t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        from samed2_kit.utils.modes import evaluation

        with evaluation(self.model):
            res = self.model.decode(f, Prompts(t(points), t(labels), masks=t(mask_input)), False,
                                    use_memory=False)  # fmt: skip
        out = (res.low_res_logits, res.iou, res.object_score_logits, res.tokens)
        return dict(zip(self.DECODED, (_np(x) for x in out), strict=True))


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
        self._sam = SimpleNamespace(**self.config)  # what _sam2's slot/position rules read
        self.image_size = int(self.config["image_size"])
        self.clip_len = int(self.config["clip_len"])
        self.max_obj_ptrs = int(self.config["max_obj_ptrs_in_encoder"])
        self.device = torch.device("cpu")
        self.image_path = image_path

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

    # the steps of volume propagation (torch tensors in and out, as `volume.sequence`'s)
    def encode(self, images: torch.Tensor, clip_len: int) -> ImageFeatures:
        return _features(self.image_path.encode(_np(images), clip_len))

    def prompted(self, feats: ImageFeatures, prompts: Prompts):
        """A prompted slice (`volume.sequence.prompted` without corrective rounds)."""
        from samed2_kit.volume.sequence import SliceResult

        coords, labels = _points(prompts)
        masks = None if prompts.masks is None else _np(prompts.masks)
        res = self.image_path.decode(_feature_dict(feats), coords, labels, masks)
        low, obj = res["low_res_logits"], res["object_score_logits"]
        memory, pointer = self.encode_memory(_np(feats.image_embed), low, obj,
                                             res["mask_tokens"], res["iou"])  # fmt: skip
        low, iou, obj = (torch.from_numpy(res[k]) for k in ("low_res_logits", "iou",
                                                            "object_score_logits"))  # fmt: skip
        return SliceResult(low, low, iou, obj, torch.from_numpy(memory),
                           torch.from_numpy(pointer))  # fmt: skip

    def from_mask(self, feats: ImageFeatures, low: torch.Tensor, obj: torch.Tensor):
        """A slice whose result is given as logits `low` (B, 1, S/4, S/4) and object score
        `obj` (B, 1): the decoder runs on the mask only for the object pointer."""
        from samed2_kit.volume.sequence import SliceResult

        res = self.image_path.decode(_feature_dict(feats), None, None, _np(low))
        memory, pointer = self.encode_memory(_np(feats.image_embed), _np(low), _np(obj),
                                             res["mask_tokens"], res["iou"])  # fmt: skip
        return SliceResult(low, low, torch.from_numpy(res["iou"]), obj,
                           torch.from_numpy(memory), torch.from_numpy(pointer))  # fmt: skip

    def propagated(self, feats: ImageFeatures, memory: torch.Tensor | None, pointers):
        """An unprompted slice (`volume.sequence.propagated`, one image): memory (n, m, h, w)
        newest first, the prompted slice's last, or None; pointers ((P, 1, C), distances,
        sequence length) or None."""
        from samed2_kit.volume.sequence import NO_OBJECT_LOGIT, SliceResult

        embed = _np(feats.image_embed)
        cond = embed
        if memory is not None:
            slots = _sam2.frame_slots(self._sam, len(memory) - 1)
            c = embed.shape[1]
            ptr, rel = np.zeros((0, 1, c), np.float32), np.zeros((0,), np.float32)
            if pointers is not None:
                ptr = _np(pointers[0])
                rel = _sam2.pointer_positions(self._sam, pointers[1], pointers[2]).numpy()
            cond = self.attend(embed, _np(feats.pos), _np(memory)[None], slots, ptr, rel)
        d = _feature_dict(feats)
        d["image_embed"] = cond
        pad = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.int64)  # sam2's padding point
        res = self.image_path.decode(d, *pad, None)
        raw, obj = res["low_res_logits"], res["object_score_logits"]
        low = np.where(obj[..., None, None] > 0, raw, np.float32(NO_OBJECT_LOGIT))
        low = low.astype(np.float32)
        mem, pointer = self.encode_memory(embed, low, obj, res["mask_tokens"], res["iou"])
        t = torch.from_numpy
        return SliceResult(t(raw), t(low), t(res["iou"]), t(obj), t(mem), t(pointer))


def _np(t) -> np.ndarray:
    """A tensor (or array) as a contiguous float32/int64 numpy array."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)


def _features(d: dict) -> ImageFeatures:
    t = torch.from_numpy
    return ImageFeatures(t(d["image_embed"]), [t(d["high_res_0"]), t(d["high_res_1"])],
                         t(d["pos"]))  # fmt: skip


def _feature_dict(f: ImageFeatures) -> dict[str, np.ndarray]:
    return dict(zip(ImagePath.FEATURES, (_np(t) for t in (f.image_embed, *f.high_res, f.pos)),
                    strict=True))  # fmt: skip


def _points(p: Prompts) -> tuple:
    """Prompts -> (points (B, N, 2) float32, labels (B, N) int64) or (None, None): box corners
    labelled 2 / 3 first, then the clicks (`_sam2.embed_prompts`' rule)."""
    coords, labels = [], []
    if p.boxes is not None:
        b = _np(p.boxes).reshape(-1, 2, 2)
        coords.append(b)
        labels.append(np.tile(np.array([[2, 3]], np.int64), (len(b), 1)))
    if p.points is not None:
        coords.append(_np(p.points))
        labels.append(_np(p.point_labels).astype(np.int64))
    if not coords:
        return None, None
    return np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)


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
