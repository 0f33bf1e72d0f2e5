"""SAMed2Model: sam2's modules wrapped by composition, with one forward for training.

Data flow of `forward(images, prompts)` (B images, one object prompt each):

    images (B, 3, S, S) --image encoder [+ encoder adapters]--> ImageFeatures
        --memory (optional)--> conditioned ImageFeatures
    prompt sources (optional) --> one PromptContribution each (`samed2_kit.sources.base`)
    prompts (or, when none are given, the sources' suggested points) --prompt encoder-->
        sparse (B, N, C), dense (B, C, h, w)
        + sum_i gate_i * contribution_i      (prompt sources; gates start at 0)
    --mask decoder--> low-res logits (B, M, S/4, S/4), IoU (B, M), object score (B, 1)

Three seams, each tested; their kinds are registered in `samed2_kit.registry` (docs/extending.md):
- encoder adapters: `add_adapter(kind, cfg)` injects a registered adapter kind into the Hiera
  blocks (`encoder_blocks`); adapters read `clip` (T, the number of adjacent slices per clip in a
  batch of B = clips * T images) while the encoder runs;
- prompt sources: `add_prompt_source(name, module, kind)`; each is called as
  `source(feats, prompts, SourceContext)` and returns a `PromptContribution`; few-shot sources read
  support examples (`forward(..., support_images=, support_masks=)` or `decode(..., support=)`);
- memory: `memory` module with `condition(sam, features, meta) -> features`, applied before the
  decoder (`samed2_kit.memory`: retrieval + SAM 2 memory attention).
Parts that learn without gradients (`learners()`: the memory, stateful sources) share one
training interface (`samed2_kit.types.Learner`). `samed2_kit.model.assemble` builds, saves and
loads a whole model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from samed2_kit.model import _sam2
from samed2_kit.model.spec import ModelSpec
from samed2_kit.types import (
    ClipContext,
    ImageFeatures,
    Learner,
    Prompts,
    SAMed2Output,
    SourceContext,
    Support,
)

__all__ = ["ClipContext", "Prompts", "SAMed2Model", "SAMed2Output"]


class SAMed2Model(nn.Module):
    """sam2's `SAM2Base` modules plus our seams. `self.sam` is the sam2 module (never subclassed)."""

    def __init__(self, sam: nn.Module, spec: ModelSpec, load_report=None):
        super().__init__()
        self.sam = sam
        self.spec = spec
        self.load_report = load_report  # what loading the starting checkpoint found (or None)
        self.clip = ClipContext()
        self.adapter_configs: dict[str, object] = {}  # adapter kind -> the config it was added with
        self.prompt_sources = nn.ModuleDict()
        self.source_gates = nn.ParameterDict()
        self.source_kinds: dict[str, str] = {}  # source name -> its kind (samed2_kit.registry)
        self.memory: nn.Module | None = None

    @property
    def image_size(self) -> int:
        return self.sam.image_size

    @property
    def encoder_blocks(self) -> nn.ModuleList:
        """Hiera blocks, in order: the attachment points for encoder adapters."""
        return _sam2.hiera_blocks(self.sam)

    def add_adapter(self, kind: str, cfg) -> None:
        """Inject an adapter of a registered kind (`samed2_kit.registry.ADAPTERS`) with `cfg`,
        recorded in `adapter_configs` (what the manifest saves)."""
        from samed2_kit.registry import adapter_kind

        if kind in self.adapter_configs:
            raise ValueError(f"the model already has a {kind!r} adapter: add each kind once")
        adapter_kind(kind).inject(self, cfg)
        self.adapter_configs[kind] = cfg

    def add_prompt_source(self, name: str, source: nn.Module, kind: str | None = None) -> None:
        """Register a prompt source (of registered `kind`, default: `name`); its gate starts at
        0, so predictions are unchanged until training opens it."""
        if name in self.prompt_sources:
            raise ValueError(f"prompt source {name!r} is already registered")
        self.prompt_sources[name] = source
        self.source_gates[name] = nn.Parameter(torch.zeros(()))
        self.source_kinds[name] = kind or name

    def support_sources(self) -> dict[str, nn.Module]:
        """The prompt sources that read support examples (few-shot), by name."""
        from samed2_kit.registry import SOURCES, source_kind

        kinds = {n: k for n, k in self.source_kinds.items() if k in SOURCES}
        return {n: self.prompt_sources[n] for n, k in kinds.items() if source_kind(k).needs_support}

    def learners(self) -> dict[str, Learner]:
        """The parts that learn without gradients (`samed2_kit.types.Learner`), by name: the
        confidence memory ("memory") and the stateful prompt sources."""
        parts = {"memory": self.memory} if self.memory is not None else {}
        parts.update(self.prompt_sources.items())
        return {n: p for n, p in parts.items() if isinstance(p, Learner)}

    @contextlib.contextmanager
    def learning(self):
        """While training: the confidence memory accepts writes (evaluation never writes)."""
        if self.memory is None:
            yield
            return
        old, self.memory.writing = self.memory.writing, True
        try:
            yield
        finally:
            self.memory.writing = old

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
        fallback_in_training: bool = False,
        pad_empty: bool = False,
    ) -> SAMed2Output:
        """Memory conditioning, prompt sources and the mask decoder for a batch of features.

        `use_memory=False` skips the confidence memory's conditioning: for callers that condition
        `feats` themselves (volume propagation attends over its own frames and the bank's).
        `fallback_in_training`: sam2's unstable-single-mask fallback also while training
        (`_sam2.decode`; sequence training, whose propagated slices rely on it at inference).
        `pad_empty`: an image left without any prompt (none given, none suggested) gets sam2's
        padding point (label -1), as sam2's video path decodes an unprompted frame (propagation);
        otherwise it gets no sparse prompt, as sam2's image predictor."""
        encoder_feats = feats
        if self.memory is not None and use_memory:
            feats = self.memory.condition(self.sam, feats, meta or {})
        # sources read the encoder's features (like the supports' and the memory keys), so what
        # they add does not depend on what the memory retrieved
        ctx = SourceContext(self.sam, self.image_size, meta or {}, support)
        contribs = {n: src(encoder_feats, prompts, ctx) for n, src in self.prompt_sources.items()}
        if prompts.empty():
            prompts = suggested_prompts(contribs.values(), prompts)
        if pad_empty and prompts.empty():  # sam2's `_forward_sam_heads` without point inputs
            b, dev = feats.image_embed.shape[0], feats.image_embed.device
            prompts = Prompts(torch.zeros(b, 1, 2, device=dev),
                              -torch.ones(b, 1, dtype=torch.int64, device=dev))  # fmt: skip
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
        logits, iou, obj, tokens = _sam2.decode(self.sam, feats, sparse, dense, multimask_output,
                                        fallback_in_training=fallback_in_training)  # fmt: skip
        aux = {n: c.aux_logits for n, c in contribs.items() if c.aux_logits is not None}
        return SAMed2Output(logits, iou, obj, feats, encoder_feats, aux, prompts, tokens=tokens)

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
        prompts: Prompts | None = None,
        multimask_output: bool = False,
        clip_len: int = 1,
        meta: dict | None = None,
        support_images: torch.Tensor | None = None,
        support_masks: torch.Tensor | None = None,
        support_index: torch.Tensor | None = None,
        *,
        run=None,
    ) -> SAMed2Output:
        """One training/inference step: images (B, 3, S, S) + one prompt per image -> masks.

        Few-shot sources: support_images (B_s, 3, S, S) and support_masks (B_s, 1, S, S);
        support_index (B_s,) the query each support serves (None: all serve every query).
        `run`: another kind of step, called as `run(self, images)` (the first argument may then
        be anything, e.g. a batch), so that DDP and autocast see it as this module's forward
        (`samed2_kit.volume.sequence_forward`)."""
        if run is not None:
            return run(self, images)
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
