"""Prompt sources: extra prompts for SAM 2's mask decoder, fused through zero-initialised gates.

- `SimilarityPrior` (Sim-MPNet DMW-LA + W-LD): a prototype memory per class, read per pixel into
  the dense prompt; updated without gradients, only while training.
- `HardPrototypes` (CoW): prototypes mined from the errors of a support example's
  self-prediction; a mask prompt and positive/negative clicks for a query (few-shot).

Names load on first use (PEP 562): the CLI parser imports nothing heavy.
"""

from samed2_kit.utils.lazy import lazy_exports

_WHERE = {
    "PromptContribution": "base",
    "PromptSource": "base",
    "SourceContext": "base",
    "Support": "base",
    "SimilarityPrior": "similarity",
    "SimilarityPriorConfig": "similarity",
    "DSGIM": "dsgim",
    "HardPrototypes": "hard",
    "HardPrototypesConfig": "hard",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
