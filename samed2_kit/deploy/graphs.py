"""Torch modules with plain-tensor inputs and outputs around a `SAMed2Model`: what
`torch.onnx.export` traces (`samed2_kit.deploy.export`). Shapes: S the model's input side in px,
C its hidden width (256 in Meta's variants), h = w = S / 16.

`EncoderGraph(model, clip_len=T)`:

    image (T, 3, S, S) float32, ImageNet-normalised (`medbank.preprocess.to_model_input`); the
        slice of interest at T // 2, its neighbours around it (T = 1 for 2D images)
    -> image_embed (1, C, h, w)        `no_mem_embed` added, as `_sam2.encode_image`
       high_res_0  (1, C / 8, 4h, 4w)  the decoder's high-resolution features
       high_res_1  (1, C / 4, 2h, 2w)
       pos         (1, C, h, w)        the embedding's sine positional encoding (a constant of
                                       the size; memory attention reads it)
    of the centre slice; temporal adapters mix the T slices (T is fixed per graph).

`DecoderGraph(model)` (sam2's prompt encoder + mask decoder, with the prompt sources):

    image_embed, high_res_0, high_res_1     the encoder graph's outputs
    point_coords (1, N, 2) float32          x, y in model-input pixels (0..S)
    point_labels (1, N) float32             1 fg click, 0 bg click, 2 / 3 box corners (x0, y0) /
                                            (x1, y1), -1 padding (coordinates ignored)
    mask_input (1, 1, 4h, 4w) float32       mask-prompt logits (e.g. an earlier low_res_masks)
    has_mask_input (1,) float32             1: use mask_input; 0: the "no mask" embedding
    -> low_res_masks (1, 4, 4h, 4w)         logits of all four mask tokens: 0 the single-mask
                                            token, 1..3 the multimask tokens
       iou_predictions (1, 4)               predicted IoU of each
       object_score_logits (1, 1)
       mask_tokens (1, 4, C)                the decoder's mask output tokens (object pointers
                                            are made of token 0 for a single mask, as sam2)

N is dynamic (0 for a mask-only prompt). The caller lays out the sparse prompt as sam2's image
predictor does (`runtime.prompt_arrays`): box corners first, then the clicks, then one padding
point (label -1) whenever there is any point or box. Choosing between the single mask and the
multimask outputs (incl. sam2's unstable-single-mask fallback) happens outside the graph, on all
four outputs (`runtime.select_masks`), so one graph serves both and reproduces sam2 exactly.

Prompt sources: a source that needs supports (few-shot) contributes nothing without them, so it
is left out of the graph (`exportable_sources`); every other source runs inside the graph on the
encoder features, its dense and mask contributions added through its gate as
`SAMed2Model.decode` does. A source returning memory entries or suggested clicks cannot be
exported: a ValueError names it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from samed2_kit.model import _sam2
from samed2_kit.types import ImageFeatures, Prompts, SourceContext

TORCH_FIX = "predict with backend='torch' instead"


@dataclass
class SourcePlan:
    """Which prompt sources go into the decoder graph: `included` {name: kind}, `left_out`
    {name: why} (sources that need supports; they add nothing without them)."""

    included: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)


def _needs_support(kind: str) -> bool:
    from samed2_kit.registry import SOURCES, source_kind

    return kind in SOURCES and source_kind(kind).needs_support


def exportable_sources(model) -> SourcePlan:
    """Check every prompt source of `model` by calling it once on zero features (eval mode, no
    grad): sources that need supports are left out; a source returning memory entries or clicks
    is a ValueError naming it."""
    plan = SourcePlan()
    if not len(model.prompt_sources):
        return plan
    s, c = model.image_size, int(model.sam.hidden_dim)
    feats = _zero_features(model, s, c)
    ctx = SourceContext(model.sam, s, {}, None)
    for name, source in model.prompt_sources.items():
        kind = model.source_kinds.get(name, name)
        if _needs_support(kind):
            plan.left_out[name] = (
                f"kind {kind!r} reads supports (few-shot): without supports it adds nothing, and "
                "set_support is not available with backend='onnx'"
            )
            continue
        was = source.training
        source.eval()
        try:
            with torch.no_grad():
                contrib = source(feats, Prompts(), ctx)
        finally:
            source.train(was)
        bad = [f for f in ("memory", "points") if getattr(contrib, f) is not None]
        if bad:
            what = "memory entries (memory attention)" if "memory" in bad else "suggested clicks"
            raise ValueError(
                f"prompt source {name!r} (kind {kind!r}) returns {what}, which the ONNX export "
                f"does not support: {TORCH_FIX}, or export a model without that source"
            )
        plan.included[name] = kind
    return plan


def _zero_features(model, s: int, c: int) -> ImageFeatures:
    h = s // 16
    p = next(model.parameters())
    z = torch.zeros(1, c, h, h, device=p.device, dtype=p.dtype)
    high = [z.new_zeros(1, c // 8, 4 * h, 4 * h), z.new_zeros(1, c // 4, 2 * h, 2 * h)]
    return ImageFeatures(z, high, z.clone())


def merge_lora_into_copy(model):
    """A deep copy of `model` with its active LoRA/LoHa/LoKr set merged into the base weights and
    the peft wrappers replaced by their (merged) base layers: plain nn.Linear modules that trace
    into plain MatMuls. `model` is unchanged. Without adapters: a plain deep copy."""
    from samed2_kit.adapters import lora

    out = copy.deepcopy(model)
    if not lora.lora_sets(out):
        return out
    if not lora.is_merged(out):
        lora.merge_lora(out)
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in out.sam.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = out.sam.get_submodule(parent_name) if parent_name else out.sam
        setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # it has no adapter layers any more
        out.sam.__dict__.pop(attr, None)
    return out


class EncoderGraph(nn.Module):
    """image (T, 3, S, S) -> image_embed, high_res_0, high_res_1, pos of the centre slice
    (module docstring). T = `clip_len` is fixed: the temporal adapters reshape by it."""

    def __init__(self, model, clip_len: int = 1):
        super().__init__()
        if clip_len < 1:
            raise ValueError(f"EncoderGraph: clip_len={clip_len}, use 1 or more slices")
        self.model = model
        self.clip_len = int(clip_len)

    def forward(self, image: torch.Tensor):
        t = self.clip_len
        with self.model._clip(t, None):
            feats = _sam2.encode_image(self.model.sam, image)
        c = t // 2
        one = slice(c, c + 1)
        return (
            feats.image_embed[one],
            feats.high_res[0][one],
            feats.high_res[1][one],
            feats.pos[one],
        )


class DecoderGraph(nn.Module):
    """Prompt encoder + prompt sources + mask decoder on plain tensors (module docstring)."""

    def __init__(self, model, sources: SourcePlan | None = None):
        super().__init__()
        self.model = model
        self.sources = sources if sources is not None else exportable_sources(model)
        sam = model.sam
        # constants of the embedding grid, computed once in torch (bit-identical to what the
        # torch path computes, rather than sin/cos evaluated again by the runtime)
        self.register_buffer("image_pe", _sam2.dense_pe(sam).detach().clone())
        h = model.image_size // 16
        like = torch.zeros(1, int(sam.hidden_dim), h, h, device=self.image_pe.device)
        with torch.no_grad():
            self.register_buffer("pos", _sam2.embedding_pos(sam, like).detach().clone())

    def forward(self, image_embed, high_res_0, high_res_1, point_coords, point_labels,
                mask_input, has_mask_input):  # fmt: skip
        model, sam = self.model, self.model.sam
        feats = ImageFeatures(image_embed, [high_res_0, high_res_1], self.pos)
        labels = point_labels.to(torch.int)
        sparse = _sam2.embed_points(sam, point_coords, labels)
        dense = _sam2.embed_mask_or_none(sam, mask_input, has_mask_input)
        if self.sources.included:  # as SAMed2Model.decode adds them
            ctx = SourceContext(sam, model.image_size, {}, None)
            prompts = Prompts(point_coords, labels)
            for name in self.sources.included:
                c = model.prompt_sources[name](feats, prompts, ctx)
                gate = model.source_gates[name]
                if c.dense is not None:
                    dense = dense + gate * c.dense
                if c.mask_logits is not None:
                    dense = dense + gate * _sam2.embed_mask(sam, c.mask_logits)
        masks, iou, tokens, obj = _sam2.decode_all(sam, feats, sparse, dense, self.image_pe)
        return masks, iou, obj, tokens
