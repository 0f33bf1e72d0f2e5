"""SAMed2Model: sam2's modules wrapped by composition, with one forward for training.

Data flow of `forward(images, prompts)` (B images, one object prompt each):

    images (B, 3, S, S) --image encoder [+ encoder adapters]--> ImageFeatures
        --memory (optional)--> conditioned ImageFeatures
    prompts --prompt encoder--> sparse (B, N, C), dense (B, C, h, w)
        + sum_i gate_i * contribution_i      (prompt sources; gates start at 0)
    --mask decoder--> low-res logits (B, M, S/4, S/4), IoU (B, M), object score (B, 1)

Three seams, each tested:
- encoder: adapters attach to the Hiera blocks (`encoder_blocks`) and read `clip` (T, the number of
  adjacent slices per clip in a batch of B = clips * T images) while the encoder runs;
- prompt sources: `add_prompt_source(name, module)`; each returns a `PromptContribution`;
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


@dataclass
class PromptContribution:
    """What a prompt source adds; any field may be None.

    dense: (B, C, h, w) added to the dense prompt embedding.
    mask_logits: (B, 1, S/4, S/4) a mask prompt, embedded by SAM 2's mask encoder and added.
    """

    dense: torch.Tensor | None = None
    mask_logits: torch.Tensor | None = None


@dataclass
class SAMed2Output:
    """low_res_logits (B, M, S/4, S/4); iou (B, M) predicted IoU in [0, 1];
    object_score_logits (B, 1); features: the (memory-conditioned) image features the decoder
    used; encoder_features: the image encoder's, before memory (what memory entries are made of)."""

    low_res_logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    features: ImageFeatures | None = None
    encoder_features: ImageFeatures | None = None


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
    ) -> SAMed2Output:
        """Memory conditioning, prompt fusion and the mask decoder for a batch of features."""
        encoder_feats = feats
        if self.memory is not None:
            feats = self.memory.condition(self.sam, feats, meta or {})
        batch = feats.image_embed.shape[0]
        sparse, dense = _sam2.embed_prompts(
            self.sam, prompts.points, prompts.point_labels, prompts.boxes, prompts.masks, batch
        )
        dense = self._fuse_sources(feats, prompts, dense)
        logits, iou, obj = _sam2.decode(self.sam, feats, sparse, dense, multimask_output)
        return SAMed2Output(logits, iou, obj, feats, encoder_feats)

    def _fuse_sources(self, feats: ImageFeatures, prompts: Prompts, dense: torch.Tensor):
        for name, source in self.prompt_sources.items():
            contrib: PromptContribution = source(feats, prompts)
            gate = self.source_gates[name]
            if contrib.dense is not None:
                dense = dense + gate * contrib.dense
            if contrib.mask_logits is not None:
                dense = dense + gate * _sam2.embed_mask(self.sam, contrib.mask_logits)
        return dense

    def forward(
        self,
        images: torch.Tensor,
        prompts: Prompts,
        multimask_output: bool = False,
        clip_len: int = 1,
        meta: dict | None = None,
    ) -> SAMed2Output:
        """One training/inference step: images (B, 3, S, S) + one prompt per image -> masks."""
        feats = self.encode(images, clip_len, meta)
        return self.decode(feats, prompts, multimask_output, meta)
