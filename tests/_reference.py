"""The plain SAM 2 reference: box-prompted masks computed with sam2's own modules, no samed2_kit.

`tests/unit/test_wrapper.py` checks that `SAMed2Model` gives exactly these outputs; the benchmarks
(`bench/bench_wrapper.py`, `bench_memory.py`, `bench_train.py`) time it as the "plain SAM 2" arm.

Imported as `tests._reference` in both places: pytest puts the repository root on `sys.path`
(`pythonpath = ["."]` in pyproject's `[tool.pytest.ini_options]`), and each bench script inserts
the repository root into `sys.path` itself (they run as `python bench/<name>.py` from the root).
"""

from __future__ import annotations

import torch


def direct_sam2(sam, images: torch.Tensor, boxes: torch.Tensor, multimask: bool = False):
    """One box per image through sam2's image path, as sam2's `SAM2ImagePredictor` does it.

    `sam` is a `sam2.modeling.sam2_base.SAM2Base` (e.g. `build_model(...).sam`); `images` are
    `(B, 3, S, S)` model-input images, `boxes` `(B, 4)` xyxy in input pixels. Steps: image encoder
    (`forward_image`), backbone features flattened by `_prepare_backbone_features`, `no_mem_embed`
    added to the lowest-resolution map (no memory: a single image), the box as two corner points
    (labels 2, 3) through the prompt encoder, then the mask decoder with the high-resolution maps.

    Returns `(masks, iou, object_score_logits)`: `(B, M, S/4, S/4)` low-resolution mask logits,
    `(B, M)` predicted IoU and `(B, 1)` object-score logits, with M = 3 if `multimask` else 1.
    """
    out = sam.forward_image(images)
    _, feats, _, sizes = sam._prepare_backbone_features(out)
    feats[-1] = feats[-1] + sam.no_mem_embed
    b = images.shape[0]
    maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(feats, sizes, strict=True)]
    coords = boxes.reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]], device=boxes.device).expand(b, 2)
    sparse, dense = sam.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    masks, iou, _, obj = sam.sam_mask_decoder(
        image_embeddings=maps[-1],
        image_pe=sam.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        repeat_image=False,
        high_res_features=maps[:-1],
    )
    return masks, iou, obj
