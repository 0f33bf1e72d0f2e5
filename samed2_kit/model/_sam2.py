"""The only place that touches sam2 internals (private methods, attribute layout, Hydra configs).

sam2==1.1.0 is pinned exactly; if an upgrade changes what is used here, this file is what to mend.
Never import `sam2.utils.transforms`, `sam2.sam2_image_predictor` or the automatic mask generator:
they import torchvision, which cannot be imported on CPU torch.
"""

from __future__ import annotations

import torch

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
    ptr = sam.obj_ptr_proj(token)
    if sam.pred_obj_scores:
        present = object_score_logits.sigmoid() if sam.soft_no_obj_ptr else (
            object_score_logits > 0).to(ptr.dtype)  # fmt: skip
        if sam.fixed_no_obj_ptr:
            ptr = present * ptr
        ptr = ptr + (1 - present) * sam.no_obj_ptr
    return ptr


def pointer_tokens(sam: torch.nn.Module, pointers: torch.Tensor, distances: list[int],
                   num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Object pointers (P, B, C) of earlier frames, `distances[i]` frames from the current one,
    as memory tokens for memory attention: (P * C / mem_dim, B, mem_dim) tokens and their
    positional encodings, as `SAM2Base._prepare_memory_conditioned_features` makes them
    (`num_frames`: the length of the sequence, which bounds the encoding's scale)."""
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    p, b, c = pointers.shape
    m = sam.mem_dim
    if sam.add_tpos_enc_to_obj_ptrs:
        t_max = max(min(num_frames, sam.max_obj_ptrs_in_encoder) - 1, 1)
        dim = c if sam.proj_tpos_enc_in_obj_ptrs else m
        rel = torch.tensor(distances, device=pointers.device, dtype=torch.float32)
        pos = sam.obj_ptr_tpos_proj(get_1d_sine_pe(rel / t_max, dim=dim).to(pointers.dtype))
        pos = pos.unsqueeze(1).expand(-1, b, m)
    else:
        pos = pointers.new_zeros(p, b, m)
    if m < c:  # one pointer -> C / mem_dim tokens
        pointers = pointers.reshape(p, b, c // m, m).permute(0, 2, 1, 3).flatten(0, 1)
        pos = pos.repeat_interleave(c // m, dim=0)
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
    import torch.nn.functional as F

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
