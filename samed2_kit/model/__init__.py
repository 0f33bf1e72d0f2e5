"""SAM 2 model building, the training wrapper and the notebook predictor."""

from samed2_kit.model.build import VARIANTS, ModelSpec, build_model
from samed2_kit.model.wrapper import Prompts, SAMed2Model, SAMed2Output
from samed2_kit.sources.base import PromptContribution

__all__ = [
    "VARIANTS",
    "ModelSpec",
    "Prompts",
    "PromptContribution",
    "SAMed2Model",
    "SAMed2Output",
    "build_model",
]
