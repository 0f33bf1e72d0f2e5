"""The extension points, by name: adapter kinds (`ADAPTERS`) and prompt-source kinds (`SOURCES`).

A kind is one entry; everything else (recipes, freeze groups, the trainable table, saving and
loading a model, the few-shot paths) loops over these tables. A new kind is one file and one call:

    from samed2_kit.registry import AdapterKind, register_adapter

    register_adapter(AdapterKind(name="bottleneck", config=BottleneckConfig,
                                 inject=inject_bottleneck, pattern=r"\\.bottleneck\\."))

after which a recipe may say `adapters: {bottleneck: {width: 16}}` (`docs/extending.md`).
The built-in kinds are listed as "module:attribute" strings and imported on first use, so this
module, and the recipe schema that reads it, import no torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterKind:
    """An adapter kind.

    name: the key under a recipe's `adapters:` and in a saved model's manifest.
    config: its config dataclass (the recipe section, validated key by key).
    inject: `inject(model, cfg)` adds it to a `SAMed2Model` (identity at init, by convention).
    pattern: regex (re.search) over `model.named_parameters()` names selecting its parameters:
        they form the freeze group `group`, are kept out of SAM 2's own groups, and are saved in
        the model's adapters file.
    group: freeze group name (`train.trainable`, `train.lr_mult`); default: `name`.
    label: row of the trainable-parameter table; default: `name`.
    describe: `describe(model) -> dict | None`, the JSON config of what the model holds, for
        the manifest; default: the config `model.add_adapter` recorded.
    restore: `restore(model, saved)` re-injects from `describe`'s output before the tensors
        load; default: `inject(model, from_dict(config, saved))`.
    """

    name: str
    config: type
    inject: Callable[[Any, Any], Any]
    pattern: str
    group: str = ""
    label: str = ""
    describe: Callable[[Any], dict | None] | None = None
    restore: Callable[[Any, dict], Any] | None = None

    @property
    def group_name(self) -> str:
        return self.group or self.name


@dataclass(frozen=True)
class SourceKind:
    """A prompt-source kind (`samed2_kit.types.PromptSource`).

    name: the key under a recipe's `sources:`; the source is registered on the model by it.
    config: its config dataclass.
    build: `build(cfg, model, tasks) -> nn.Module`; `tasks` are the run's task names (or None).
    needs_support: the source reads support examples (few-shot): the `support` evaluation
        protocol, `Predictor.set_support` and training episodes need one such source.
    max_supports: `max_supports(module) -> int`, the most supports one query may have.
    save_state / load_state: `save_state(module, folder) -> [file names]` and
        `load_state(module, folder)`, for state kept outside the module's parameters and
        buffers (those are saved anyway): called for saved models and training checkpoints.
    Built sources carry their config as `module.cfg` (saved in the model's manifest).
    """

    name: str
    config: type
    build: Callable[[Any, Any, list[str] | None], Any]
    needs_support: bool = False
    max_supports: Callable[[Any], int] | None = None
    save_state: Callable[[Any, Any], list[str]] | None = None
    load_state: Callable[[Any, Any], None] | None = None


# built-ins: name -> "module:attribute" of the kind (imported on first use)
ADAPTERS: dict[str, AdapterKind | str] = {
    "temporal": "samed2_kit.adapters.temporal:KIND",
    "lora": "samed2_kit.adapters.lora:KIND",
}
SOURCES: dict[str, SourceKind | str] = {
    "similarity_prior": "samed2_kit.sources.similarity:KIND",
    "hard_prototypes": "samed2_kit.sources.hard:KIND",
}


def _register(table: dict, kind, replace: bool, what: str):
    if kind.name in table and not replace:
        raise ValueError(
            f"{what} kind {kind.name!r} is already registered: pick another name, or pass "
            "replace=True to redefine it"
        )
    table[kind.name] = kind
    return kind


def register_adapter(kind: AdapterKind, replace: bool = False) -> AdapterKind:
    """Add an adapter kind (peft's `register_peft_method`, for our adapters)."""
    return _register(ADAPTERS, kind, replace, "adapter")


def register_source(kind: SourceKind, replace: bool = False) -> SourceKind:
    """Add a prompt-source kind."""
    return _register(SOURCES, kind, replace, "prompt source")


def unregister(name: str) -> None:
    """Remove a kind added by `register_*` (tests); built-ins stay."""
    for table, builtin in ((ADAPTERS, _BUILTIN_ADAPTERS), (SOURCES, _BUILTIN_SOURCES)):
        if name in table and name not in builtin:
            del table[name]


_BUILTIN_ADAPTERS = frozenset(ADAPTERS)
_BUILTIN_SOURCES = frozenset(SOURCES)


def _resolve(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(
            f"unknown {what} kind {name!r}: known are {sorted(table)} (register a new one with "
            f"samed2_kit.registry.register_{what.split()[-1]})"
        )
    kind = table[name]
    if isinstance(kind, str):
        module, attr = kind.split(":")
        kind = table[name] = getattr(importlib.import_module(module), attr)
    return kind


def adapter_kind(name: str) -> AdapterKind:
    return _resolve(ADAPTERS, name, "adapter")


def source_kind(name: str) -> SourceKind:
    return _resolve(SOURCES, name, "source")


def adapter_kinds() -> list[AdapterKind]:
    """Every adapter kind, in registration order (built-ins first)."""
    return [adapter_kind(n) for n in list(ADAPTERS)]


def source_kinds() -> list[SourceKind]:
    return [source_kind(n) for n in list(SOURCES)]


def adapter_configs() -> dict[str, type]:
    """{adapter kind: its config class}: the schema of a recipe's `adapters:` section."""
    return {k.name: k.config for k in adapter_kinds()}


def source_configs() -> dict[str, type]:
    """{source kind: its config class}: the schema of a recipe's `sources:` section."""
    return {k.name: k.config for k in source_kinds()}
