"""Which prompt sources a recipe turns on, how they attach to a model, and their saved config.

    sources:                         # in a recipe
      similarity_prior: {slots: 32}  # classes default to the recipe's tasks
      hard_prototypes: {hard: 8}

`attach_sources(model, cfg, classes)` registers them under these names; `save_model` writes
`sources.json` (each source's config) beside the weights, and `load_model` attaches the same
sources before the tensors load (they travel in the adapters file).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from samed2_kit.sources.hard import HardPrototypes, HardPrototypesConfig
from samed2_kit.sources.similarity import SimilarityPrior, SimilarityPriorConfig

SOURCES_FILE = "sources.json"
SOURCES_VERSION = 1


@dataclass
class SourcesConfig:
    """Prompt sources of a recipe (None: off)."""

    similarity_prior: SimilarityPriorConfig | None = None
    hard_prototypes: HardPrototypesConfig | None = None

    def any(self) -> bool:
        return self.similarity_prior is not None or self.hard_prototypes is not None


def _model_id(model) -> dict:
    return {"variant": model.spec.variant, "image_size": model.spec.image_size}


def _build(name: str, cfg, model):
    dim = int(model.sam.hidden_dim)
    if name == "similarity_prior":
        return SimilarityPrior(cfg, dim, _model_id(model))
    return HardPrototypes(cfg, dim)


def attach_sources(model, cfg: SourcesConfig, classes: list[str] | None = None) -> list[str]:
    """Register the configured sources on `model` (SAMed2Model); `classes` fills the similarity
    prior's class list when its config leaves it empty. Returns the names registered."""
    names = []
    for field in dataclasses.fields(cfg):
        sub = getattr(cfg, field.name)
        if sub is None:
            continue
        if field.name == "similarity_prior" and not sub.classes:
            if not classes:
                raise ValueError(
                    "the similarity prior needs its classes (one per task): set "
                    "sources.similarity_prior.classes or data.tasks in the recipe"
                )
            sub = dataclasses.replace(sub, classes=list(classes))
        model.add_prompt_source(field.name, _build(field.name, sub, model))
        names.append(field.name)
    return names


def sources_config(model) -> dict | None:
    """What `sources.json` holds for `model`: each registered source's config (None: none)."""
    types = {SimilarityPrior: "similarity_prior", HardPrototypes: "hard_prototypes"}
    out = {}
    for name, src in model.prompt_sources.items():
        kind = types.get(type(src))
        if kind is None:
            raise ValueError(
                f"prompt source {name!r} ({type(src).__name__}) is not a built-in source, so it "
                "cannot be saved with the model: save its state yourself"
            )
        out[name] = {"type": kind, "config": dataclasses.asdict(src.cfg)}
    if not out:
        return None
    return {"version": SOURCES_VERSION, "model": _model_id(model), "sources": out}


def attach_saved(model, saved: dict, where) -> None:
    """Attach the sources a `sources.json` describes (before loading their tensors)."""
    from samed2_kit.config import from_dict

    if saved.get("version", 0) > SOURCES_VERSION:
        raise ValueError(f"{where} has sources format {saved.get('version')}: upgrade samed2-kit")
    if saved.get("model") != _model_id(model):
        raise ValueError(
            f"{where}: these prompt sources were saved with model {saved.get('model')}, this "
            f"model is {_model_id(model)}: load them into a model of that variant and size"
        )
    kinds = {"similarity_prior": SimilarityPriorConfig, "hard_prototypes": HardPrototypesConfig}
    for name, entry in saved["sources"].items():
        if entry["type"] not in kinds:
            raise ValueError(f"{where}: unknown prompt source type {entry['type']!r}")
        cfg = from_dict(kinds[entry["type"]], entry["config"], f"sources.{name}", str(where))
        model.add_prompt_source(name, _build(entry["type"], cfg, model))
