"""The one place that assembles a model from a recipe, and saves and loads it with one manifest.

    model = from_recipe(recipe, tasks=["fetal_head"])  # SAM 2 + adapters + memory + sources
    save(model, "runs/a", extra={"recipe": to_dict(recipe)})
    model = load("runs/a")

A saved folder:

    model.json          the manifest (format 2): the ModelSpec (variant, image size, clip length
                        T), the adapters {kind: config}, the prompt sources {name: {kind,
                        config}}, the memory config, the sha256 of the weights, and `extra`
    model.safetensors   sam2's base weights under sam2's own names (plain SAM 2 code loads them)
    adapters-default.*  adapter, prompt-source and gate tensors (`samed2_kit.adapters.io`)
    memory.safetensors  the confidence memory bank, when the model has one

Folders of format 1 (model.json with only variant and image size, `sources.json`, T only in the
saved recipe) still load. Every file is written atomically; the manifest last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from samed2_kit import registry
from samed2_kit.model.spec import ModelSpec
from samed2_kit.utils.atomic import sha256_file
from samed2_kit.utils.dataconf import from_dict, to_dict

MANIFEST = "model.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2
SOURCES_V1 = "sources.json"  # format 1 only


def from_recipe(recipe, tasks: list[str] | None = None, skip_adapters: tuple[str, ...] = ()):
    """The recipe's model: seeded init (or `model.checkpoint`), its adapters (in registry order,
    those in `skip_adapters` left out), the confidence memory and the prompt sources (`tasks`:
    the run's task names, e.g. the similarity prior's classes)."""
    from samed2_kit.model.build import build_model

    m = recipe.model
    torch.manual_seed(recipe.train.seed)  # the random init (and any unloaded weights) by seed
    model = build_model(m.variant, m.checkpoint, m.image_size, clip_len=recipe.data.clip_len)
    add_adapters(model, {k: v for k, v in recipe.adapters.items() if k not in skip_adapters})
    if recipe.memory is not None:
        from samed2_kit.memory import attach_memory

        attach_memory(model, recipe.memory)
    add_sources(model, recipe.sources, tasks)
    return model


def add_adapters(model, adapters: dict) -> list[str]:
    """Inject the adapters {kind: config} into `model`, in registry order (so the random init
    does not depend on the order a recipe lists them in); returns the kinds injected."""
    names = [k.name for k in registry.adapter_kinds() if k.name in adapters]
    for name in names:
        model.add_adapter(name, adapters[name])
    unknown = sorted(set(adapters) - set(names))
    if unknown:
        raise ValueError(f"unknown adapter kinds {unknown}: known are {sorted(registry.ADAPTERS)}")
    return names


def add_sources(model, sources: dict, tasks: list[str] | None = None) -> list[str]:
    """Build and register the prompt sources {kind: config} on `model`, in registry order."""
    names = []
    for kind in registry.source_kinds():
        if kind.name in sources:
            model.add_prompt_source(kind.name, kind.build(sources[kind.name], model, tasks))
            names.append(kind.name)
    unknown = sorted(set(sources) - set(names))
    if unknown:
        raise ValueError(
            f"unknown prompt source kinds {unknown}: known are {sorted(registry.SOURCES)}"
        )
    return names


def _sources_manifest(model) -> dict:
    out = {}
    for name, source in model.prompt_sources.items():
        kind = model.source_kinds.get(name)
        if kind not in registry.SOURCES or not hasattr(source, "cfg"):
            raise ValueError(
                f"prompt source {name!r} ({type(source).__name__}) is not of a registered kind "
                "with a `cfg`, so it cannot be saved with the model: register its kind "
                "(samed2_kit.registry.register_source) and add it by that kind"
            )
        out[name] = {"kind": kind, "config": to_dict(source.cfg)}
    return out


def manifest(model, extra: dict | None = None) -> dict:
    """What `model.json` holds for `model` (without the file digests)."""
    from samed2_kit.adapters.io import describe_adapters

    memory = getattr(model, "memory", None)
    return {
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "adapters": describe_adapters(model),
        "sources": _sources_manifest(model),
        "memory": to_dict(memory.cfg) if memory is not None else None,
        **(extra or {}),
    }


def save(model, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `model` into `folder` (see the module docstring); returns the folder."""
    from safetensors.torch import save_file

    from samed2_kit.adapters.io import base_state_dict, has_adapters, save_adapters
    from samed2_kit.utils.atomic import atomic_path, write_text

    folder = Path(folder)
    meta = manifest(model, extra)  # first: a model that cannot be saved writes nothing
    state = {k: v.detach().contiguous().cpu() for k, v in base_state_dict(model).items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(
            state, str(tmp), metadata={"format": "samed2-kit", "version": str(FORMAT_VERSION)}
        )
    if has_adapters(model):
        save_adapters(model, folder)
    names = save_state(model, folder)  # the memory bank, source kinds' state files
    meta["files"] = {name: sha256_file(folder / name) for name in [WEIGHTS, *names]}
    write_text(folder / MANIFEST, json.dumps(meta, indent=2, default=str))
    return folder


def _hooks(model):
    """(source module, its kind) for every prompt source of a registered kind."""
    for name, source in model.prompt_sources.items():
        if model.source_kinds.get(name) in registry.SOURCES:
            yield source, registry.source_kind(model.source_kinds[name])


def save_state(model, folder: Path) -> list[str]:
    """Files of the parts whose state is not in the state dict (the memory bank, source kinds'
    `save_state`), written into `folder`; returns their names. Checkpoints use it too."""
    names = model.memory.save_state(folder) if getattr(model, "memory", None) is not None else []
    for source, kind in _hooks(model):
        if kind.save_state is not None:
            names += kind.save_state(source, Path(folder))
    return names


def load_state(model, folder: Path) -> None:
    """Read back what `save_state` wrote."""
    if getattr(model, "memory", None) is not None:
        model.memory.load_state(folder)
    for source, kind in _hooks(model):
        if kind.load_state is not None:
            kind.load_state(source, Path(folder))


def read_manifest(folder: Path) -> dict:
    """`model.json` of a saved folder as format 2 (format 1 converted)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass a folder written by `samed2 train`/`quickstart` "
            "(it holds model.safetensors and model.json)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable or not valid JSON ({e}): re-copy the run "
                         "folder or save the model again") from e  # fmt: skip
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a JSON object: re-copy the run folder or save the "
                         "model again")  # fmt: skip
    version = meta.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format {version}; this samed2-kit reads up to "
                         f"{FORMAT_VERSION}: upgrade samed2-kit")  # fmt: skip
    if version == FORMAT_VERSION and "spec" not in meta:
        raise ValueError(f"{path} has no `spec` (variant, image size): re-copy the run folder "
                         "or save the model again")  # fmt: skip
    return meta if version == FORMAT_VERSION else _from_v1(meta, folder, path)


def _from_v1(meta: dict, folder: Path, path: Path) -> dict:
    """A format-1 model.json (+ sources.json, memory file) as a format-2 manifest."""
    clip = ((meta.get("recipe") or {}).get("data") or {}).get("clip_len") or 1
    spec = ModelSpec.from_dict({**meta, "clip_len": clip}, str(path))
    sources = {}
    if (folder / SOURCES_V1).is_file():
        saved = json.loads((folder / SOURCES_V1).read_text())
        if saved.get("model") != spec.model_id():
            raise ValueError(f"{folder / SOURCES_V1}: saved with model {saved.get('model')}, "
                             f"model.json says {spec.model_id()}: the folder is inconsistent")  # fmt: skip
        sources = {
            n: {"kind": e["type"], "config": e["config"]} for n, e in saved["sources"].items()
        }
    rest = {k: v for k, v in meta.items() if k not in ("format_version", "variant", "image_size")}
    return {**rest, "format_version": 1, "spec": spec.to_dict(), "sources": sources}


def load(folder_or_file: str | Path, device: str | torch.device | None = None):
    """Rebuild a model written by `save` (a folder or its model.safetensors)."""
    from samed2_kit.model.build import build_model, verify_run_file

    path = Path(folder_or_file)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run folder written by `samed2 train`/`quickstart`"
        )
    folder = path if path.is_dir() else path.parent
    meta = read_manifest(folder)
    for name in meta.get("files") or {}:  # the weights: checked by build_model as it reads them
        if name != WEIGHTS and (folder / name).is_file():
            verify_run_file(folder / name)
    spec = ModelSpec.from_dict(meta["spec"], str(folder / MANIFEST))
    model = build_model(spec.variant, folder / WEIGHTS, spec.image_size, device, strict=True,
                        clip_len=spec.clip_len)  # fmt: skip
    for name, entry in (meta.get("sources") or {}).items():  # a place for their tensors
        kind = registry.source_kind(entry["kind"])
        cfg = from_dict(kind.config, entry["config"], f"sources.{name}", str(folder / MANIFEST))
        model.add_prompt_source(name, kind.build(cfg, model, None), kind.name)
    model.to(device or "cpu")
    if (folder / "adapters-default.json").is_file():
        from samed2_kit.adapters.io import load_adapters

        load_adapters(model, folder)  # injects the saved adapters first
    from samed2_kit.memory import MEMORY_FILE, ConfidenceMemory, attach_memory

    if (folder / MEMORY_FILE).is_file():  # the bank carries its own config
        bank = ConfidenceMemory.load(folder / MEMORY_FILE, spec.model_id())
        attach_memory(model, bank.cfg).bank = bank
    for source, kind in _hooks(model):
        if kind.load_state is not None:
            kind.load_state(source, folder)
    return model
