"""The torch side of volume propagation on ONNX (`samed2_kit.deploy.propagation`): the memory
graphs as torch modules, their export, `TorchImagePath`, and the tensor <-> array conversions of
`OnnxPropagation`'s torch-facing steps. Kept apart so that the onnxruntime runner imports without
torch; `samed2_kit.deploy.propagation` re-exports these names lazily.

I/O of the two graphs: `samed2_kit.deploy.propagation`'s docstring.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from samed2_kit.deploy.contract import DEFAULT_OPSET, META_KEY, RESULT_KEYS, ImagePath
from samed2_kit.model import _sam2
from samed2_kit.types import ImageFeatures, Prompts


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
        return dict(zip(self.FEATURES, (as_array(t) for t in (f.image_embed, *f.high_res, f.pos)),
                        strict=True))  # fmt: skip

    @torch.no_grad()
    def decode(self, feats: dict, points, labels, mask_input) -> dict[str, np.ndarray]:
        f = features_of(feats)
        t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        from samed2_kit.utils.modes import evaluation

        with evaluation(self.model):
            res = self.model.decode(f, Prompts(t(points), t(labels), masks=t(mask_input)), False,
                                    use_memory=False)  # fmt: skip
        out = (res.low_res_logits, res.iou, res.object_score_logits, res.tokens)
        return dict(zip(self.DECODED, (as_array(x) for x in out), strict=True))


def as_array(t) -> np.ndarray:
    """A tensor (or array) as a contiguous float32/int64 numpy array."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    return np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)


def features_of(d: dict) -> ImageFeatures:
    """`ImagePath.FEATURES` arrays (shapes: `ImagePath`) -> ImageFeatures of tensors sharing
    their memory."""
    t = torch.from_numpy
    return ImageFeatures(t(d["image_embed"]), [t(d["high_res_0"]), t(d["high_res_1"])],
                         t(d["pos"]))  # fmt: skip


def feature_arrays(f: ImageFeatures) -> dict[str, np.ndarray]:
    """ImageFeatures -> {`ImagePath.FEATURES`: float32 arrays}, the inverse of `features_of`."""
    return dict(zip(ImagePath.FEATURES, (as_array(t) for t in (f.image_embed, *f.high_res, f.pos)),
                    strict=True))  # fmt: skip


def prompt_points(p: Prompts) -> tuple:
    """Prompts -> (points (B, N, 2) float32, labels (B, N) int64) or (None, None): box corners
    labelled 2 / 3 first, then the clicks (`_sam2.embed_prompts`' rule)."""
    coords, labels = [], []
    if p.boxes is not None:
        b = as_array(p.boxes).reshape(-1, 2, 2)
        coords.append(b)
        labels.append(np.tile(np.array([[2, 3]], np.int64), (len(b), 1)))
    if p.points is not None:
        coords.append(as_array(p.points))
        labels.append(as_array(p.point_labels).astype(np.int64))
    if not coords:
        return None, None
    return np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)


def slice_result(arrays: dict):
    """`OnnxPropagation`'s numpy result of one slice ({`RESULT_KEYS`: arrays}) as the
    `volume.sequence.SliceResult` the torch steps return."""
    from samed2_kit.volume.sequence import SliceResult

    return SliceResult(*(torch.from_numpy(arrays[k]) for k in RESULT_KEYS))
