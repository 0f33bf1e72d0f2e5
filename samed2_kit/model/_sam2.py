"""The only place that touches sam2 internals (private methods, attribute layout, Hydra configs).

sam2==1.1.0 is pinned exactly; if an upgrade changes what is used here, this file is what to mend.
Never import `sam2.utils.transforms`, `sam2.sam2_image_predictor` or the automatic mask generator:
they import torchvision, which cannot be imported on CPU torch.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from samed2_kit.types import ImageFeatures

__all__ = ["ImageFeatures"]  # re-exported: the type lives in samed2_kit.types


def instantiate(model_cfg) -> torch.nn.Module:
    """Build a `SAM2Base` from an OmegaConf `model:` node with Hydra's instantiate (no global
    Hydra state is used: sam2's package import initialises it, we never compose through it)."""
    from hydra.utils import instantiate as hydra_instantiate
    from omegaconf import OmegaConf

    OmegaConf.resolve(model_cfg)
    return hydra_instantiate(model_cfg, _recursive_=True)


def encode_image(sam: torch.nn.Module, images: torch.Tensor) -> ImageFeatures:
    """Run the image encoder on `images` (B, 3, S, S), ImageNet-normalised; exactly what sam2's
    image predictor does in `set_image` (forward_image + no_mem_embed), batched."""
    backbone_out = sam.forward_image(images)
    _, vision_feats, vision_pos, feat_sizes = sam._prepare_backbone_features(backbone_out)
    if sam.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + sam.no_mem_embed
    b = images.shape[0]
    maps = [
        f.permute(1, 2, 0).reshape(b, -1, *hw)
        for f, hw in zip(vision_feats, feat_sizes, strict=True)
    ]
    pos = vision_pos[-1].permute(1, 2, 0).reshape(b, -1, *feat_sizes[-1])
    return ImageFeatures(image_embed=maps[-1], high_res=maps[:-1], pos=pos)


def embed_prompts(
    sam: torch.nn.Module,
    points: torch.Tensor | None,
    point_labels: torch.Tensor | None,
    boxes: torch.Tensor | None,
    masks: torch.Tensor | None,
    batch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder, as sam2's image predictor calls it: box corners become points labelled 2/3,
    placed before the clicks. Coordinates are in model-input pixels (0..S).

    Returns sparse (B, N', C) and dense (B, C, h, w) embeddings.
    """
    coords, labels = None, None
    if boxes is not None:
        coords = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).expand(len(boxes), 2)
    if points is not None:
        plabels = point_labels.to(torch.int)
        coords = points if coords is None else torch.cat([coords, points], dim=1)
        labels = plabels if labels is None else torch.cat([labels, plabels], dim=1)
    enc = sam.sam_prompt_encoder
    if coords is None and masks is None:
        # No prompt at all: an empty sparse set and the "no mask" dense embedding.
        sparse = torch.empty(batch, 0, enc.embed_dim, device=enc.no_mask_embed.weight.device)
        dense = enc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch, -1, *enc.image_embedding_size
        )
        return sparse, dense
    pts = (coords, labels) if coords is not None else None
    return enc(points=pts, boxes=None, masks=masks)


def embed_mask(sam: torch.nn.Module, mask_logits: torch.Tensor) -> torch.Tensor:
    """Dense embedding of mask logits (B, 1, 4h, 4w) minus the "no mask" embedding: what adding
    this mask as a prompt changes in the dense prompt (B, C, h, w)."""
    enc = sam.sam_prompt_encoder
    return enc._embed_masks(mask_logits) - enc.no_mask_embed.weight.reshape(1, -1, 1, 1)


def dense_pe(sam: torch.nn.Module) -> torch.Tensor:
    """Positional encoding of the image-embedding grid, (1, C, h, w)."""
    return sam.sam_prompt_encoder.get_dense_pe()


def embed_points(sam: torch.nn.Module, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sparse prompt (B, N, C) of points the caller laid out as `embed_prompts` does (box
    corners labelled 2 / 3 first, clicks 1 / 0, then sam2's padding point labelled -1): the
    prompt encoder's point embedding without adding a padding point (ONNX export,
    `samed2_kit.deploy.graphs`). N may be 0."""
    return sam.sam_prompt_encoder._embed_points(coords, labels, pad=False)


def embed_mask_or_none(
    sam: torch.nn.Module, masks: torch.Tensor, use: torch.Tensor
) -> torch.Tensor:
    """Dense prompt (B, C, h, w): the mask embedding of `masks` (B, 1, 4h, 4w) where `use` (B,)
    is > 0, else the "no mask" embedding: `embed_prompts`' dense output as a tensor choice."""
    enc = sam.sam_prompt_encoder
    none = enc.no_mask_embed.weight.reshape(1, -1, 1, 1)
    none = none.expand(masks.shape[0], -1, *enc.image_embedding_size)
    return torch.where(use.reshape(-1, 1, 1, 1) > 0, enc._embed_masks(masks), none)


def decode_all(sam: torch.nn.Module, feats: ImageFeatures, sparse: torch.Tensor, dense: torch.Tensor,
               image_pe: torch.Tensor | None = None):  # fmt: skip
    """The mask decoder's outputs for all its mask tokens, before sam2 picks the single or the
    multimask ones: logits (B, 4, 4h, 4w), IoU (B, 4), tokens (B, 4, C), object score logits
    (B, 1) (`decode` selects from these)."""
    return sam.sam_mask_decoder.predict_masks(
        image_embeddings=feats.image_embed, image_pe=dense_pe(sam) if image_pe is None else image_pe,
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=False,
        high_res_features=feats.high_res,
    )  # fmt: skip


def embedding_pos(sam: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The sine positional encoding (1, C, h, w) of an image embedding shaped like `like`, as the
    encoder's neck makes it (`ImageFeatures.pos`; a constant of the size)."""
    return sam.image_encoder.neck.position_encoding(like[:1]).to(like.dtype)


def decode(
    sam: torch.nn.Module,
    feats: ImageFeatures,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
    repeat_image: bool = False,
    fallback_in_training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask decoder. Returns low-res mask logits (B, M, 4h, 4w), predicted IoU (B, M), object
    score logits (B, 1) and the output tokens (B, M', C) sam2 makes object pointers of (M' = 3
    with `multimask_output` and `use_multimask_token_for_obj_ptr`, else 1); M = 3 with
    `multimask_output`, else 1.

    A single mask falls back to the best of the three multimask outputs when it is unstable
    (sam2's `dynamic_multimask_via_stability`), in eval mode only in sam2; with
    `fallback_in_training` also while training, so that what trains is what inference selects."""
    dec = sam.sam_mask_decoder
    if fallback_in_training and dec.training and not multimask_output:
        if dec.dynamic_multimask_via_stability:
            masks, iou, tokens, obj = dec.predict_masks(
                image_embeddings=feats.image_embed, image_pe=dense_pe(sam),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                repeat_image=repeat_image, high_res_features=feats.high_res,
            )  # fmt: skip
            masks, iou = dec._dynamic_multimask_via_stability(masks, iou)
            return masks, iou, obj, tokens[:, 0:1]  # the single-mask token, as sam2's forward
    masks, iou, tokens, obj = dec(
        image_embeddings=feats.image_embed,
        image_pe=dense_pe(sam),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask_output,
        repeat_image=repeat_image,
        high_res_features=feats.high_res,
    )
    return masks, iou, obj, tokens


def object_pointer(sam: torch.nn.Module, tokens: torch.Tensor, iou: torch.Tensor,
                   object_score_logits: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """sam2's object pointer (B, C) of a decoded frame (`SAM2Base._forward_sam_heads`): the
    output token of the best mask (by predicted IoU, when there are several) through
    `obj_ptr_proj`, replaced by `no_obj_ptr` where the object score says "absent"."""
    token = tokens[:, 0]
    if tokens.shape[1] > 1:
        token = tokens[torch.arange(len(tokens), device=tokens.device), iou.argmax(dim=-1)]
    return pointer_of_token(sam, token, object_score_logits)


def pointer_of_token(sam: torch.nn.Module, token: torch.Tensor,
                     object_score_logits: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The object pointer (B, C) of the chosen output token (B, C) and object score (B, 1):
    `obj_ptr_proj`, gated by the score as `object_pointer` says."""
    ptr = sam.obj_ptr_proj(token)
    if sam.pred_obj_scores:
        present = object_score_logits.sigmoid() if sam.soft_no_obj_ptr else (
            object_score_logits > 0).to(ptr.dtype)  # fmt: skip
        if sam.fixed_no_obj_ptr:
            ptr = present * ptr
        ptr = ptr + (1 - present) * sam.no_obj_ptr
    return ptr


def pointer_positions(sam: torch.nn.Module, distances: list[int], num_frames: int) -> torch.Tensor:
    """Relative temporal positions (P,) float32 of object pointers `distances[i]` frames from the
    current one in a sequence of `num_frames`: distance / max(min(num_frames,
    max_obj_ptrs_in_encoder) - 1, 1), what sam2 feeds its pointers' sine encoding."""
    t_max = max(min(num_frames, sam.max_obj_ptrs_in_encoder) - 1, 1)
    return torch.tensor(distances, dtype=torch.float32) / t_max


def pointer_tokens(sam: torch.nn.Module, pointers: torch.Tensor, distances: list[int],
                   num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Object pointers (P, B, C) of earlier frames, `distances[i]` frames from the current one,
    as memory tokens for memory attention: (P * C / mem_dim, B, mem_dim) tokens and their
    positional encodings, as `SAM2Base._prepare_memory_conditioned_features` makes them
    (`num_frames`: the length of the sequence, which bounds the encoding's scale)."""
    rel = pointer_positions(sam, distances, num_frames).to(pointers.device)
    return pointer_tokens_at(sam, pointers, rel)


def pointer_tokens_at(sam: torch.nn.Module, pointers: torch.Tensor,
                      rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`pointer_tokens` from relative positions rel (P,) float32 (`pointer_positions`); traceable
    for any P >= 0 (the propagation ONNX graph runs it)."""
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    p, b, c = pointers.shape
    m = sam.mem_dim
    if sam.add_tpos_enc_to_obj_ptrs:
        dim = c if sam.proj_tpos_enc_in_obj_ptrs else m
        pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(rel, dim=dim).to(pointers.dtype))
        pos = pos.unsqueeze(1).expand(-1, b, m)
    else:
        pos = torch.zeros_like(pointers[..., :m])
    if m < c:  # one pointer -> C / mem_dim tokens, each with its pointer's encoding
        k = c // m
        # split + stack, then a merge whose -1 is the only size that may be 0 (P = 0 in ONNX)
        pointers = torch.stack(pointers.split(m, dim=-1), dim=1).reshape(-1, b, m)
        pos = pos.unsqueeze(1).expand(-1, k, -1, -1).reshape(-1, b, m)
    return pointers, pos


def hiera_blocks(sam: torch.nn.Module) -> torch.nn.ModuleList:
    """The Hiera trunk's blocks: where encoder adapters attach."""
    return sam.image_encoder.trunk.blocks


def hiera_block_forward(block: torch.nn.Module, x: torch.Tensor, after_attn=None) -> torch.Tensor:
    """sam2 1.1.0 `MultiScaleBlock.forward`, line for line, with one seam for encoder adapters.

    x: (B, H, W, C) -> (B, H', W', C_out); H' = H / q_stride in q-pool blocks, else H.
    `after_attn(y)` receives the attention output after `window_unpartition`, i.e. the un-windowed
    per-image map (B, H', W', C_out) (global blocks: the attention output itself), and returns a
    tensor of the same shape; it runs before the residual `shortcut + drop_path(y)`.
    With `after_attn=None` the result equals `block(x)` exactly.
    """
    from sam2.modeling.backbones.hieradet import do_pool
    from sam2.modeling.backbones.utils import window_partition, window_unpartition

    shortcut = x  # B, H, W, C
    x = block.norm1(x)

    # Skip connection
    if block.dim != block.dim_out:
        shortcut = do_pool(block.proj(x), block.pool)

    # Window partition
    window_size = block.window_size
    if window_size > 0:
        H, W = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, window_size)

    # Window attention + Q pooling (if stage change)
    x = block.attn(x)
    if block.q_stride:
        # Shapes have changed due to Q pooling
        window_size = block.window_size // block.q_stride[0]
        H, W = shortcut.shape[1:3]

        pad_h = (window_size - H % window_size) % window_size
        pad_w = (window_size - W % window_size) % window_size
        pad_hw = (H + pad_h, W + pad_w)

    # Reverse window partition
    if block.window_size > 0:
        x = window_unpartition(x, window_size, pad_hw, (H, W))

    if after_attn is not None:
        x = after_attn(x)

    x = shortcut + block.drop_path(x)
    # MLP
    x = x + block.drop_path(block.mlp(block.norm2(x)))
    return x


def raw_embed(sam: torch.nn.Module, feats: ImageFeatures) -> torch.Tensor:
    """The image embedding (B, C, h, w) without `no_mem_embed`: what sam2 feeds its memory
    attention and memory encoder (the image-only path adds `no_mem_embed` instead)."""
    if sam.directly_add_no_mem_embed:
        return feats.image_embed - sam.no_mem_embed.reshape(1, -1, 1, 1)
    return feats.image_embed


def memory_dim(sam: torch.nn.Module) -> int:
    """Channels of a memory-encoder feature map (64 in Meta's variants)."""
    return int(sam.mem_dim)


def encode_memory(
    sam: torch.nn.Module, feats: ImageFeatures, low_res_logits: torch.Tensor, object_score_logits
) -> torch.Tensor:
    """Memory-encoder features (B, mem_dim, h, w) of predictions, as sam2's `_encode_new_memory`
    makes them: the raw embedding fused with sigmoid(mask logits at S x S) * scale + bias, plus
    `no_obj_embed_spatial` where the object score says "no object"."""
    size = sam.image_size
    hi = F.interpolate(low_res_logits[:, :1].float(), (size, size), mode="bilinear",
                       align_corners=False)  # fmt: skip
    mask = torch.sigmoid(hi) * sam.sigmoid_scale_for_mem_enc + sam.sigmoid_bias_for_mem_enc
    out = sam.memory_encoder(raw_embed(sam, feats), mask, skip_mask_sigmoid=True)
    maskmem = out["vision_features"]
    if sam.no_obj_embed_spatial is not None:
        absent = (object_score_logits <= 0).float().reshape(-1, 1, 1, 1)
        maskmem = maskmem + absent * sam.no_obj_embed_spatial.reshape(1, -1, 1, 1)
    return maskmem


def retrieved_slots(sam: torch.nn.Module, n: int) -> list[int]:
    """Temporal encodings of n retrieved memory entries, the first the most relevant:
    num_maskmem - 2 - r for entry r, floored at 0 (the confidence memory's reads)."""
    top = sam.num_maskmem - 1
    return [top - min(r + 1, top) for r in range(n)]


def frame_slots(sam: torch.nn.Module, recent: int, prompted: int = 1) -> list[int]:
    """sam2's temporal encodings for `recent` earlier results (most recent first: a frame d steps
    back gets d - 1, at most num_maskmem - 2) then `prompted` conditioning frames
    (num_maskmem - 1), as `SAM2Base._prepare_memory_conditioned_features` assigns them."""
    top = sam.num_maskmem - 1
    return [min(r, top - 1) for r in range(recent)] + [top] * prompted


def memory_pos(sam: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
    """Sine positional encoding (1, mem_dim, h, w) of memory features shaped like `like`
    (recomputed, never stored)."""
    return sam.memory_encoder.position_encoding(like[:1]).to(like.dtype)


def attend_memory(sam: torch.nn.Module, feats: ImageFeatures, memory: torch.Tensor,
                  slots: list[int] | None = None, pointers: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """SAM 2 memory attention of a batch over retrieved memories.

    memory: (B, n, mem_dim, h, w) entries per image. slots: the temporal encoding of each entry
    (an index into sam2's `maskmem_tpos_enc`): sam2's video path gives a frame d steps back d - 1
    and a conditioning (prompted) frame num_maskmem - 1 (`frame_slots`). None (retrieved
    entries, the first the most relevant): entry r gets num_maskmem - 2 - r, floored at 0.
    pointers: (object pointers (P, B, C), their distances in frames, the sequence length) of
    earlier frames (`pointer_tokens`), attended to as well, as sam2's video path does.
    Returns the conditioned image embedding (B, C, h, w), as sam2's video path gives its decoder.
    """
    b, n, m, h, w = memory.shape
    pos = memory_pos(sam, memory[:, 0]).flatten(2).permute(2, 0, 1)  # (hw, 1, m)
    slots = retrieved_slots(sam, n) if slots is None else slots
    if len(slots) != n:
        raise ValueError(f"attend_memory: {len(slots)} temporal slots for {n} memory entries")
    tpos = sam.maskmem_tpos_enc[torch.as_tensor(slots, device=memory.device)]
    mem = memory.permute(1, 3, 4, 0, 2).reshape(n * h * w, b, m)  # entry-major tokens
    mem_pos = (
        (pos.unsqueeze(0) + tpos.reshape(n, 1, 1, m)).reshape(n * h * w, 1, m).expand(-1, b, -1)
    )
    mem_pos, n_ptr = mem_pos.to(mem.dtype), 0
    if pointers is not None and sam.use_obj_ptrs_in_encoder:
        ptr, ptr_pos = pointer_tokens(sam, *pointers)
        mem, mem_pos = (
            torch.cat([mem, ptr.to(mem.dtype)]),
            torch.cat([mem_pos, ptr_pos.to(mem.dtype)]),
        )
        n_ptr = ptr.shape[0]
    curr = raw_embed(sam, feats).flatten(2).permute(2, 0, 1)  # (hw, B, C)
    curr_pos = feats.pos.flatten(2).permute(2, 0, 1)
    out = sam.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=mem,
                               memory_pos=mem_pos, num_obj_ptr_tokens=n_ptr)  # fmt: skip
    return out.permute(1, 2, 0).reshape(b, -1, h, w)


# --- memory attention in real arithmetic (exportable: no complex numbers) -----------------------
#
# sam2's RoPEAttention rotates query/key channel pairs (2i, 2i + 1) as complex numbers by
# `compute_axial_cis` angles (torch.polar, view_as_complex): not exportable to ONNX. The functions
# below compute the same rotation with cos/sin tables, and sam2's `MemoryAttention.forward` /
# `MemoryAttentionLayer.forward` around it, with the same weights.


@functools.lru_cache(maxsize=16)
def _rope_tables(dim: int, theta: float, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: (dim // 4)].float() / dim))
    t = torch.arange(h * w, dtype=torch.float32)
    tx, ty = t % w, torch.div(t, w, rounding_mode="floor")
    angles = torch.cat([torch.outer(tx, freqs), torch.outer(ty, freqs)], dim=-1)
    return angles.cos(), angles.sin()


def rope_tables(attn: torch.nn.Module, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (h*w, d/2) float32 of sam2's axial rotary encoding of a RoPEAttention
    `attn` (head width d, its `rope_theta`) over an h x w token grid: sam2's
    `compute_axial_cis(d, end_x=w, end_y=h, theta)` as real numbers. Token t = y*w + x; pair
    i < d/4 turns by x * theta^(-4i/d), pair d/4 + i by y * theta^(-4i/d)."""
    kw = attn.compute_cis.keywords  # sam2 keeps the head width and theta in this partial
    cos, sin = _rope_tables(int(kw["dim"]), float(kw["theta"]), int(h), int(w))
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, N, d) by the tables (n, d/2) (`rope_tables`), computed in float32 and
    returned in x's dtype, as sam2's `apply_rotary_enc`. N = r * n: keys over r memory frames
    reuse the table r times (sam2's `repeat_freqs_k`); N = n for queries."""
    # reshapes, not (un)flatten: the ONNX exporter keeps their sizes dynamic
    b, heads, n, d = x.shape
    xf = x.float().reshape(b, heads, -1, cos.shape[0], d // 2, 2)  # (B, H, r, n, d/2, 2)
    a, b_ = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b_ * sin, a * sin + b_ * cos], dim=-1)  # (a + ib)(cos + i sin)
    return out.reshape(b, heads, n, d).type_as(x)


def rope_attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   grid: tuple[int, int], k_extra: torch.Tensor | None = None,
                   v_extra: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """sam2's `RoPEAttention.forward` in real arithmetic.

    q (B, h*w, C) query tokens of the h x w `grid`; k, v (B, r*h*w, C_kv) rotated keys/values
    (r > 1 needs the module's `rope_k_repeat`, as in sam2); k_extra, v_extra (B, P, C_kv) more
    keys/values appended without rotation (sam2's `num_k_exclude_rope`: the object-pointer
    tokens) or None. Returns (B, h*w, C)."""
    if q.shape[1] != k.shape[1] and not attn.rope_k_repeat:
        raise ValueError(
            f"rope_attention: {k.shape[1]} keys for {q.shape[1]} queries needs a RoPEAttention "
            "built with rope_k_repeat=True (sam2's memory cross-attention)"
        )
    heads = attn.num_heads
    cos, sin = (t.to(q.device) for t in rope_tables(attn, *grid))
    qh = apply_rope(_heads(attn.q_proj(q), heads), cos, sin)
    kh = apply_rope(_heads(attn.k_proj(k), heads), cos, sin)
    vh = _heads(attn.v_proj(v), heads)
    if k_extra is not None:
        kh = torch.cat([kh, _heads(attn.k_proj(k_extra), heads)], dim=2)
        vh = torch.cat([vh, _heads(attn.v_proj(v_extra), heads)], dim=2)
    dropout_p = attn.dropout_p if attn.training else 0.0
    out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p)  # (B, heads, N, d)
    return attn.out_proj(out.transpose(1, 2).reshape(out.shape[0], -1, attn.internal_dim))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d), sam2's `_separate_heads`; N (the -1) may be 0."""
    return x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _attention(attn, q, k, v, grid, k_extra=None, v_extra=None) -> torch.Tensor:
    """A memory-attention layer's attention: rotary (`rope_attention`) or sam2's plain one."""
    from sam2.modeling.sam.transformer import RoPEAttention

    if isinstance(attn, RoPEAttention):
        return rope_attention(attn, q, k, v, grid, k_extra, v_extra)
    if k_extra is not None:
        k, v = torch.cat([k, k_extra], dim=1), torch.cat([v, v_extra], dim=1)
    return attn(q, k, v)


def memory_layer(layer: torch.nn.Module, tgt: torch.Tensor, query_pos: torch.Tensor,
                 memory: torch.Tensor, pos: torch.Tensor, grid: tuple[int, int],
                 extra: torch.Tensor | None = None,
                 extra_pos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """sam2's `MemoryAttentionLayer.forward` (batch first) with real-valued rotary attention.

    tgt, query_pos (B, h*w, C); memory, pos (B, r*h*w, m) spatial memory tokens (rotated);
    extra, extra_pos (B, P, m) object-pointer tokens (not rotated) or None. Returns (B, h*w, C)."""
    t2 = layer.norm1(tgt)
    qk = t2 + query_pos if layer.pos_enc_at_attn else t2
    tgt = tgt + layer.dropout1(_attention(layer.self_attn, qk, qk, t2, grid))
    t2 = layer.norm2(tgt)
    q = t2 + query_pos if layer.pos_enc_at_cross_attn_queries else t2
    keys, extra_keys = memory, extra
    if layer.pos_enc_at_cross_attn_keys:
        keys = memory + pos
        extra_keys = None if extra is None else extra + extra_pos
    tgt = tgt + layer.dropout2(
        _attention(layer.cross_attn_image, q, keys, memory, grid, extra_keys, extra)
    )
    t2 = layer.norm3(tgt)
    t2 = layer.linear2(layer.dropout(layer.activation(layer.linear1(t2))))
    return tgt + layer.dropout3(t2)


def attend_tokens(sam: torch.nn.Module, curr: torch.Tensor, curr_pos: torch.Tensor,
                  memory: torch.Tensor, memory_pos: torch.Tensor, grid: tuple[int, int],
                  extra: torch.Tensor | None = None,
                  extra_pos: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """sam2's `MemoryAttention.forward` in real arithmetic, batch first.

    curr, curr_pos (B, h*w, C) the current frame's (raw) embedding tokens of the h x w `grid`
    and their positional encoding; memory, memory_pos (B, n*h*w, m) spatial memory tokens,
    entry-major, with their positional + temporal encodings; extra, extra_pos (B, P, m) the
    object-pointer tokens or None. Returns the normed output (B, h*w, C)."""
    att = sam.memory_attention
    if not att.batch_first:
        raise ValueError(
            "attend_tokens: sam2's memory attention must be batch_first (it always is)"
        )
    out = curr + 0.1 * curr_pos if att.pos_enc_at_input else curr
    for layer in att.layers:
        out = memory_layer(layer, out, curr_pos, memory, memory_pos, grid, extra, extra_pos)
    return att.norm(out)


def memory_attention(sam: torch.nn.Module, curr: torch.Tensor, memory: torch.Tensor,
                     curr_pos: torch.Tensor, memory_pos: torch.Tensor,
                     num_obj_ptr_tokens: int = 0) -> torch.Tensor:  # fmt: skip
    """`sam.memory_attention(curr, memory, curr_pos, memory_pos, num_obj_ptr_tokens)` with sam2's
    layout (sequence first: curr (h*w, B, C), memory (N, B, m) whose last `num_obj_ptr_tokens`
    are object pointers), computed in real arithmetic (`attend_tokens`); h = w = sqrt(h*w), as
    sam2 assumes. Returns (h*w, B, C)."""
    hw = curr.shape[0]
    side = math.isqrt(hw)
    if side * side != hw:
        raise ValueError(f"memory_attention: {hw} query tokens are not a square grid")
    split = memory.shape[0] - num_obj_ptr_tokens
    mem, pos = memory.transpose(0, 1), memory_pos.transpose(0, 1)
    extra = mem[:, split:] if num_obj_ptr_tokens else None
    extra_pos = pos[:, split:] if num_obj_ptr_tokens else None
    out = attend_tokens(sam, curr.transpose(0, 1), curr_pos.transpose(0, 1), mem[:, :split],
                        pos[:, :split], (side, side), extra, extra_pos)  # fmt: skip
    return out.transpose(0, 1)
