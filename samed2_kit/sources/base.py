"""The prompt-source seam: what a source is given, what it returns, how the model fuses it.

A prompt source is an `nn.Module` called once per decode as `source(feats, prompts, ctx)`; it
returns a `PromptContribution` (any subset of its fields). `SAMed2Model` fuses each field with
the source's own learned scalar gate, initialised at 0, so a model with every source on predicts
exactly what plain SAM 2 predicts until training opens the gates:

    dense        (B, C, h, w)          dense prompt += gate * dense
    mask_logits  (B, 1, 4h, 4w)        dense prompt += gate * (SAM 2 mask encoder(mask) - no-mask)
    memory       (B, n, mem_dim, h, w) image embedding += gate * (memory attention(entries) - it)
    points, point_labels (B, N, 2), (B, N)
                                       suggested clicks in model-input pixels, used as the prompt
                                       only when the caller gives no prompt (few-shot mode)
    aux_logits   (B, 1, 4h, 4w)        the source's own prediction, supervised by the training
                                       loop with `loss.source` (not fused)

There is no sparse-token field: tokens appended to SAM 2's decoder take part in its token
self-attention even when scaled by a zero gate, so they cannot keep the identity at init.

Stateful sources (the similarity prior) may also implement, for the training loop only:

    candidates(feats, gt, meta) -> object    # no grad, on each rank, after the forward
    commit(items: list, loss: float) -> None # every rank applies every rank's items in order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # the model package imports this module
    from samed2_kit.model._sam2 import ImageFeatures


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
    def __call__(self, feats: ImageFeatures, prompts, ctx: SourceContext) -> PromptContribution: ...
