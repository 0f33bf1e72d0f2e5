"""The types every part passes around: image features, prompts, the prompt-source contract,
the model's output, and the interface of parts that learn without gradients.

Shapes: B images in a batch (B = clips x T for clips of T adjacent slices), S the model's input
side in pixels, C the hidden width, h = w = S/16 the embedding grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class ImageFeatures:
    """Image features of a batch, in the layout sam2's mask decoder takes.

    image_embed: (B, C, h, w) lowest-resolution embedding, h = w = S/16, C = hidden dim (256 in
        Meta's variants); `no_mem_embed` already added (sam2's image-only path).
    high_res: [(B, C/8, 4h, 4w), (B, C/4, 2h, 2w)] projected FPN levels for the decoder.
    pos: (B, C, h, w) sine positional encoding of `image_embed` (for memory attention).
    """

    image_embed: torch.Tensor
    high_res: list[torch.Tensor]
    pos: torch.Tensor

    def select(self, index: torch.Tensor | slice) -> ImageFeatures:
        return ImageFeatures(
            self.image_embed[index], [f[index] for f in self.high_res], self.pos[index]
        )


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
    rounds: list = field(default_factory=list)  # training's corrective passes (`engine.clicks`)
    tokens: torch.Tensor | None = None  # (B, M', C) the decoder's output tokens (object pointers)


@dataclass
class ClipContext:
    """Read by encoder adapters while the encoder runs: T adjacent slices per clip."""

    clip_len: int = 1
    meta: dict = field(default_factory=dict)


@dataclass
class Support:
    """Support examples for few-shot sources.

    features: ImageFeatures of B_s support images (the model's encoder, same size as queries).
    masks: (B_s, 1, S, S) float {0, 1} support masks in model-input pixels.
    query_index: (B_s,) long, the query each support row serves; None: every support serves
        every query (the predictor's few-shot mode: one support set for all queries).
    cache: where sources keep what they derive from these supports at inference (no grad, eval
        mode), e.g. mined prototypes; a new Support (e.g. `Predictor.set_support`) starts empty.
    """

    features: ImageFeatures
    masks: torch.Tensor
    query_index: torch.Tensor | None = None
    cache: dict = field(default_factory=dict, repr=False)

    def rows_for(self, query: int) -> torch.Tensor:
        """Indices of the support rows that serve query `query`."""
        n = self.masks.shape[0]
        if self.query_index is None:
            return torch.arange(n, device=self.masks.device)
        return torch.nonzero(self.query_index == query).flatten()


@dataclass
class SourceContext:
    """What a source may read besides the features and prompts.

    sam: the sam2 module; meta: per-clip lists (`task`, `modality`, `case_id`; may be empty);
    support: support examples (None outside few-shot use); image_size: S (model-input pixels).
    """

    sam: torch.nn.Module
    image_size: int
    meta: dict = field(default_factory=dict)
    support: Support | None = None


@dataclass
class PromptContribution:
    """What a source adds; any field may be None (see the module docstring for shapes)."""

    dense: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    aux_logits: torch.Tensor | None = None


@runtime_checkable
class PromptSource(Protocol):
    """A prompt source: an `nn.Module` called once per decode (`samed2_kit.sources.base`)."""

    def __call__(self, feats: ImageFeatures, prompts, ctx: SourceContext) -> PromptContribution: ...


@dataclass
class TrainUpdate:
    """What one micro-batch of training gives the parts that learn without gradients.

    sam: the sam2 module; out: the model's output for the micro-batch; masks: (B, 1, S, S)
    ground truth in {0, 1}; meta: per-clip lists (`task`, `modality`, `case_id`); step: the
    optimizer step this micro-batch belongs to (1-based).
    """

    sam: torch.nn.Module
    out: SAMed2Output
    masks: torch.Tensor
    meta: dict
    step: int


@runtime_checkable
class Learner(Protocol):
    """A part of the model that learns without gradients (the confidence memory, the similarity
    prior). The training loop calls, on every rank:

        item = part.candidates(update)   # after each micro-batch's forward, no grad
        part.commit(items, loss)         # after the optimizer step: every rank's items (all
                                         # micro-batches, rank order), so state stays identical

    `loss` is the step's mean loss over the global batch.
    """

    def candidates(self, update: TrainUpdate) -> object: ...

    def commit(self, items: list, loss: float) -> None: ...
