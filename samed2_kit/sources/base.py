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

Sources that learn without gradients (the similarity prior) also implement
`samed2_kit.types.Learner`, the training loop's one interface for them and the confidence memory:
`candidates(update)` after each forward (no grad, each rank), `commit(items, loss)` after the
optimizer step (every rank's items, in rank order). A kind of source is one entry of
`samed2_kit.registry.SOURCES` (`docs/extending.md`). The types live in `samed2_kit.types`.
"""

from __future__ import annotations

from samed2_kit.types import PromptContribution, PromptSource, SourceContext, Support

__all__ = ["PromptContribution", "PromptSource", "SourceContext", "Support"]
