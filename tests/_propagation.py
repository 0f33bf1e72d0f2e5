"""A test-tiny model for propagation tests: seeded, and with an object score that says "object"
everywhere (an untrained model's is arbitrary and would empty the propagated slices)."""

from __future__ import annotations

import torch

from samed2_kit.model.build import build_model


def propagating_model(image_size: int, present: bool = True, vary_slots: bool = False):
    """test-tiny at `image_size` px, seed 0, eval mode. `present`: the object-score bias set to
    +50; `vary_slots`: random temporal-slot encodings (learned in a checkpoint, zero here), so
    that memory slots differ."""
    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=image_size).eval()
    with torch.no_grad():
        if vary_slots:
            model.sam.maskmem_tpos_enc.normal_()
        if present:
            model.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(50.0)
    return model
