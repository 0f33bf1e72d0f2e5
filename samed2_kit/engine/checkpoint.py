"""Trained weights out: safetensors + a JSON config, written atomically; and back in."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from samed2_kit.model.build import ModelSpec

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
FORMAT_VERSION = 1


def save_model(model, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `folder/model.safetensors` (the sam2 module's base weights, sam2's key names),
    `folder/model.json` (variant, image size, format version, `extra`) and, when the model has
    adapters, `folder/adapters-default.safetensors/.json` (samed2_kit.adapters.io), and with a
    confidence memory, `folder/memory.safetensors`, and with prompt sources, `folder/sources.json`
    (their configs); atomically."""
    from safetensors.torch import save_file

    from samed2_kit.adapters.io import base_state_dict, has_adapters, save_adapters
    from samed2_kit.utils.atomic import atomic_path, write_text

    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in base_state_dict(model).items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(
            state, str(tmp), metadata={"format": "samed2-kit", "version": str(FORMAT_VERSION)}
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "variant": model.spec.variant,
        "image_size": model.spec.image_size,
        **(extra or {}),
    }
    write_text(folder / CONFIG, json.dumps(meta, indent=2, default=str))
    if has_adapters(model):
        save_adapters(model, folder)
    from samed2_kit.sources.registry import SOURCES_FILE, sources_config

    saved = sources_config(model)
    if saved is not None:  # the sources' configs; their tensors are in the adapters file
        write_text(folder / SOURCES_FILE, json.dumps(saved, indent=2))
    if getattr(model, "memory", None) is not None:
        from samed2_kit.memory import MEMORY_FILE

        model.memory.bank.save(folder / MEMORY_FILE)
    return folder


def load_model(folder_or_file: str | Path, device: str | torch.device | None = None):
    """Rebuild a model saved by `save_model` (a folder or its model.safetensors)."""
    from samed2_kit.model.build import build_model

    path = Path(folder_or_file)
    folder = path if path.is_dir() else path.parent
    cfg_path = folder / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{cfg_path} not found: pass a folder written by `samed2 train`/`quickstart` "
            "(it holds model.safetensors and model.json)"
        )
    meta = json.loads(cfg_path.read_text())
    for key in ("variant", "image_size"):
        if key not in meta:
            raise ValueError(f"{cfg_path} lacks the field '{key}'; re-save the model")
    spec = ModelSpec(meta["variant"], int(meta["image_size"]))
    model = build_model(spec.variant, folder / WEIGHTS, spec.image_size, device, strict=True)
    from samed2_kit.sources.registry import SOURCES_FILE, attach_saved

    if (folder / SOURCES_FILE).is_file():  # attach the sources so their tensors have a place
        attach_saved(model, json.loads((folder / SOURCES_FILE).read_text()), folder / SOURCES_FILE)
        model.to(device or "cpu")
    if (folder / "adapters-default.json").is_file():
        from samed2_kit.adapters.io import load_adapters

        load_adapters(model, folder)  # injects the saved temporal adapters / LoRA sets first
    clip_len = ((meta.get("recipe") or {}).get("data") or {}).get("clip_len")
    if clip_len:  # the T it was trained with: volume propagation encodes clips of T slices
        model.adapter_config = {"clip_len": int(clip_len)}
    from samed2_kit.memory import MEMORY_FILE, ConfidenceMemory, attach_memory

    if (folder / MEMORY_FILE).is_file():  # the bank carries its own config
        bank = ConfidenceMemory.load(folder / MEMORY_FILE, {"variant": spec.variant,
                                                           "image_size": spec.image_size})  # fmt: skip
        attach_memory(model, bank.cfg).bank = bank
    return model
