"""SAMed2Model: sam2's modules wrapped by composition, with one forward for training.

Data flow of `forward(images, prompts)` (B images, one object prompt each):

    images (B, 3, S, S) --image encoder [+ encoder adapters]--> ImageFeatures
        --memory (optional)--> conditioned ImageFeatures
    prompt sources (optional) --> one PromptContribution each (`samed2_kit.sources.base`)
    prompts (or, when none are given, the sources' suggested points) --prompt encoder-->
        sparse (B, N, C), dense (B, C, h, w)
        + sum_i gate_i * contribution_i      (prompt sources; gates start at 0)
    --mask decoder--> low-res logits (B, M, S/4, S/4), IoU (B, M), object score (B, 1)

Three seams, each tested:
- encoder: adapters attach to the Hiera blocks (`encoder_blocks`) and read `clip` (T, the number of
  adjacent slices per clip in a batch of B = clips * T images) while the encoder runs;
- prompt sources: `add_prompt_source(name, module)`; each is called as
  `source(feats, prompts, SourceContext)` and returns a `PromptContribution`; few-shot sources read
  support examples (`forward(..., support_images=, support_masks=)` or `decode(..., support=)`);
- memory: `memory` module with `condition(sam, features, meta) -> features`, applied before the
  decoder (`samed2_kit.memory`: retrieval + SAM 2 memory attention).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from samed2_kit.model import _sam2
from samed2_kit.model._sam2 import ImageFeatures
from samed2_kit.model.build import ModelSpec
from samed2_kit.sources.base import SourceContext, Support


@dataclass
class Prompts:
    """A batch of prompts, one object per image, in model-input pixels (0..S, x before y).

    points: (B, N, 2) click coordinates; point_labels: (B, N) 1 positive, 0 negative, -1 padding.
    boxes: (B, 4) x0, y0, x1, y1.  masks: (B, 1, S/4, S/4) mask-prompt logits.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self):
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("Prompts: give points and point_labels together (or neither)")

    def empty(self) -> bool:
        return self.points is None and self.boxes is None and self.masks is None


@dataclass
class SAMed2Output:
    """low_res_logits (B, M, S/4, S/4); iou (B, M) predicted IoU in [0, 1];
    object_score_logits (B, 1); features: the (memory-conditioned) image features the decoder
    used; encoder_features: the image encoder's, before memory (what memory entries are made of);
    source_logits: {source name: (B, 1, S/4, S/4)} each prompt source's own prediction
    (`aux_logits`), for the training loss; prompts: the prompts the decoder got (the caller's,
    or the sources' suggested points when the caller gave none)."""

    low_res_logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    features: ImageFeatures | None = None
    encoder_features: ImageFeatures | None = None
    source_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    prompts: Prompts | None = None


@dataclass
class ClipContext:
    """Read by encoder adapters while the encoder runs: T adjacent slices per clip."""

    clip_len: int = 1
    meta: dict = field(default_factory=dict)


class SAMed2Model(nn.Module):
    """sam2's `SAM2Base` modules plus our seams. `self.sam` is the sam2 module (never subclassed)."""

    def __init__(self, sam: nn.Module, spec: ModelSpec):
        super().__init__()
        self.sam = sam
        self.spec = spec
        self.clip = ClipContext()
        self.prompt_sources = nn.ModuleDict()
        self.source_gates = nn.ParameterDict()
        self.memory: nn.Module | None = None
        self.load_report = None

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        """Hiera blocks, in order: the attachment points for encoder adapters."""
        return _sam2.hiera_blocks(self.sam)

    def add_prompt_source(self, name: str, source: nn.Module) -> None:
        """Register a prompt source; its gate starts at 0, so predictions are unchanged until
        training opens it."""
        if name in self.prompt_sources:
            raise ValueError(f"prompt source {name!r} is already registered")
        self.prompt_sources[name] = source
        self.source_gates[name] = nn.Parameter(torch.zeros(()))

    @contextlib.contextmanager
    def _clip(self, clip_len: int, meta: dict | None):
        old = self.clip
        self.clip = ClipContext(clip_len, meta or {})
        try:
            yield
        finally:
            self.clip = old

    def encode(self, images: torch.Tensor, clip_len: int = 1, meta: dict | None = None):
        """Image features of `images` (B, 3, S, S) ImageNet-normalised; B = clips * clip_len."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size:
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}), got "
                f"{tuple(images.shape)}: resize to the model's image_size"
            )
        if images.shape[0] % clip_len:
            raise ValueError(
                f"batch of {images.shape[0]} images is not a multiple of clip_len={clip_len}"
            )
        with self._clip(clip_len, meta):
            return _sam2.encode_image(self.sam, images)

    def decode(
        self,
        feats: ImageFeatures,
        prompts: Prompts,
        multimask_output: bool = False,
        meta: dict | None = None,
        support: Support | None = None,
        *,
        use_memory: bool = True,
    ) -> SAMed2Output:
        """Memory conditioning, prompt sources and the mask decoder for a batch of features.

        `use_memory=False` skips the confidence memory's conditioning: for callers that condition
        `feats` themselves (volume propagation attends over its own frames and the bank's)."""
        encoder_feats = feats
        if self.memory is not None and use_memory:
            feats = self.memory.condition(self.sam, feats, meta or {})
        # sources read the encoder's features (like the supports' and the memory keys), so what
        # they add does not depend on what the memory retrieved
        ctx = SourceContext(self.sam, self.image_size, meta or {}, support)
        contribs = {n: src(encoder_feats, prompts, ctx) for n, src in self.prompt_sources.items()}
        if prompts.empty():
            prompts = suggested_prompts(contribs.values(), prompts)
        feats = self._fuse_memory(feats, contribs)
        batch = feats.image_embed.shape[0]
        sparse, dense = _sam2.embed_prompts(
            self.sam, prompts.points, prompts.point_labels, prompts.boxes, prompts.masks, batch
        )
        for name, c in contribs.items():
            gate = self.source_gates[name]
            if c.dense is not None:
                dense = dense + gate * c.dense
            if c.mask_logits is not None:
                dense = dense + gate * _sam2.embed_mask(self.sam, c.mask_logits)
        logits, iou, obj = _sam2.decode(self.sam, feats, sparse, dense, multimask_output)
        aux = {n: c.aux_logits for n, c in contribs.items() if c.aux_logits is not None}
        return SAMed2Output(logits, iou, obj, feats, encoder_feats, aux, prompts)

    def _fuse_memory(self, feats: ImageFeatures, contribs: dict) -> ImageFeatures:
        embed = feats.image_embed
        for name, c in contribs.items():
            if c.memory is not None:
                attended = _sam2.attend_memory(self.sam, feats, c.memory).to(embed.dtype)
                embed = embed + self.source_gates[name] * (attended - feats.image_embed)
        return feats if embed is feats.image_embed else ImageFeatures(embed, feats.high_res,
                                                                        feats.pos)  # fmt: skip

    def encode_support(self, images: torch.Tensor, masks: torch.Tensor, query_index=None):
        """Support examples for few-shot sources: images (B_s, 3, S, S), masks (B_s, 1, S, S)."""
        check_support_masks(masks, images.shape[0], self.image_size)
        return Support(self.encode(images), masks.float(), query_index)

    def forward(
        self,
        images: torch.Tensor,
        prompts: Prompts,
        multimask_output: bool = False,
        clip_len: int = 1,
        meta: dict | None = None,
        support_images: torch.Tensor | None = None,
        support_masks: torch.Tensor | None = None,
        support_index: torch.Tensor | None = None,
    ) -> SAMed2Output:
        """One training/inference step: images (B, 3, S, S) + one prompt per image -> masks.

        Few-shot sources: support_images (B_s, 3, S, S) and support_masks (B_s, 1, S, S);
        support_index (B_s,) the query each support serves (None: all serve every query)."""
        support = None
        if support_images is not None:
            b = images.shape[0]
            check_support_masks(support_masks, support_images.shape[0], self.image_size)
            if clip_len == 1:  # one encoder pass for queries and supports
                both = self.encode(torch.cat([images, support_images]), 1, meta)
                feats, sup = both.select(slice(0, b)), both.select(slice(b, None))
            else:
                feats, sup = self.encode(images, clip_len, meta), self.encode(support_images)
            support = Support(sup, support_masks.float(), support_index)
        else:
            feats = self.encode(images, clip_len, meta)
        return self.decode(feats, prompts, multimask_output, meta, support)


def check_support_masks(masks: torch.Tensor | None, n: int, size: int) -> None:
    if masks is None or tuple(masks.shape) != (n, 1, size, size):
        got = None if masks is None else tuple(masks.shape)
        raise ValueError(
            f"support masks must be ({n}, 1, {size}, {size}) (one per support image, at the "
            f"model's image size), got {got}: resize each mask with its image"
        )


def suggested_prompts(contribs, prompts: Prompts) -> Prompts:
    """The sources' suggested clicks as prompts (concatenated over sources; label -1 pads)."""
    pts = [(c.points, c.point_labels) for c in contribs if c.points is not None]
    if not pts:
        return prompts
    points = torch.cat([p for p, _ in pts], dim=1)
    labels = torch.cat([lab for _, lab in pts], dim=1)
    return Prompts(points=points, point_labels=labels)
