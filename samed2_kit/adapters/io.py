"""Adapter-only checkpoints: `adapters-<name>.safetensors` (tensors) + `adapters-<name>.json` (config).

What is saved (by name rules, whatever `requires_grad` says): the parameters of every registered
adapter kind (`samed2_kit.registry.ADAPTERS`: temporal adapters, peft sets, ...), and our own
prompt sources, their gates and memory module when the model has them. The JSON records the model
variant and image size, each adapter kind's config (`describe_adapters`), and a SHA-256 of the
base weights, so adapters are never loaded silently onto a base they were not trained on.

    save_adapters(model, "runs/ct", name="ct")
    model = build_model("tiny", checkpoint="sam2.1_hiera_tiny.pt", image_size=512)
    load_adapters(model, "runs/ct", name="ct")      # injects LoRA / temporal adapters as needed
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from samed2_kit import registry
from samed2_kit.adapters import lora as _lora
from samed2_kit.adapters.freeze import adapter_pattern
from samed2_kit.utils.atomic import atomic_path, write_text
from samed2_kit.utils.dataconf import from_dict, to_dict

FORMAT = "samed2-adapters"
VERSION = 2  # 2: adapter configs under "adapters" by kind; 1: "lora", "active_lora", "temporal"


def adapter_key() -> re.Pattern:
    """State-dict keys of a SAMed2Model that are adapters (everything else is the base model)."""
    return re.compile(rf"{adapter_pattern()}|^(?:prompt_sources|source_gates|memory)\.")


@dataclass
class LoadedAdapters:
    """What `load_adapters` did: the JSON it read, the tensors loaded, and what it injected
    ({adapter kind: what its `restore` returned}, for the kinds it injected)."""

    meta: dict
    keys: list[str] = field(default_factory=list)
    injected: dict[str, object] = field(default_factory=dict)


def describe_adapters(model: nn.Module) -> dict[str, dict]:
    """{adapter kind: its JSON config} for the kinds `model` holds (the manifest's `adapters`)."""
    out = {}
    for kind in registry.adapter_kinds():
        if kind.describe is not None:
            saved = kind.describe(model)
        else:
            cfg = getattr(model, "adapter_configs", {}).get(kind.name)
            saved = None if cfg is None else to_dict(cfg)
        if saved is not None:
            out[kind.name] = saved
    return out


def restore_adapters(model: nn.Module, saved: dict[str, dict], where: str) -> dict[str, object]:
    """Inject, from `describe_adapters`' output, the adapters `model` lacks; returns
    {kind: what its restore returned} for the kinds that injected something."""
    out = {}
    for name, cfg in saved.items():
        kind = registry.adapter_kind(name)
        if kind.restore is not None:
            result = kind.restore(model, cfg)
        elif name in model.adapter_configs:
            result = None
        else:
            config = from_dict(kind.config, cfg, f"adapters.{name}", where)
            model.add_adapter(name, config)
            result = config
        if result:
            out[name] = result
    return out


def _kinds_of(meta: dict) -> dict[str, dict]:
    """The adapter configs of an adapters JSON, by kind (version 1 files converted)."""
    if "adapters" in meta:
        return dict(meta["adapters"] or {})
    kinds = {}
    if meta.get("temporal"):
        kinds["temporal"] = meta["temporal"]
    if meta.get("lora"):
        kinds["lora"] = {"sets": meta["lora"], "active": meta.get("active_lora")}
    return kinds


def _paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    _lora.check_name(name)
    folder = Path(folder)
    return folder / f"adapters-{name}.safetensors", folder / f"adapters-{name}.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` (state-dict names), detached, contiguous, on CPU."""
    key = adapter_key()
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if key.search(k)
    }


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.sam`'s weights without adapters, under sam2's own names (peft's
    `qkv.base_layer.weight` -> `qkv.weight`): loadable into a plain model of the same variant."""
    if _lora.is_merged(model):
        raise ValueError("LoRA is merged into the base weights: call unmerge_lora(model) first")
    key = adapter_key()
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.sam.state_dict().items()
        if not key.search(k)
    }


def has_adapters(model: nn.Module) -> bool:
    key = adapter_key()
    return any(key.search(k) for k in model.state_dict())


def base_weights_hash(model: nn.Module) -> str:
    """SHA-256 of `model.sam`'s non-adapter state dict (name, dtype, shape, bytes; sorted by name).

    peft's renaming is undone (`qkv.base_layer.weight` -> `qkv.weight`), so a model with adapters
    injected hashes like its plain base. A merged model is refused (its weights are not the base).
    """
    sd = base_state_dict(model)
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(sd[k].shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def save_adapters(
    model: nn.Module, folder: str | Path, name: str = "default", extra: dict | None = None
) -> Path:
    """Write `folder/adapters-<name>.safetensors` + `.json` atomically; return the JSON path."""
    from safetensors.torch import save_file

    st_path, json_path = _paths(folder, name)
    tensors = adapter_state_dict(model)
    if not tensors:
        raise ValueError(
            "the model has no adapters to save (no LoRA, temporal adapters, prompt sources or "
            "memory): inject some, or save the full model instead"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        **model.spec.model_id(),  # variant, image_size
        "base_hash": base_weights_hash(model),
        "adapters": describe_adapters(model),
        "prompt_sources": list(getattr(model, "prompt_sources", {}) or {}),
        "memory": getattr(model, "memory", None) is not None,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "extra": json.loads(json.dumps(extra or {}, default=str)),
    }
    with atomic_path(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "samed2": FORMAT})
    meta["tensors_sha256"] = hashlib.sha256(st_path.read_bytes()).hexdigest()
    write_text(json_path, json.dumps(meta, indent=2) + "\n")
    return json_path


def list_adapter_sets(folder: str | Path) -> list[str]:
    """Names of the adapter checkpoints in `folder` (those with both files)."""
    folder = Path(folder)
    names = [
        p.name[len("adapters-") : -len(".safetensors")]
        for p in folder.glob("adapters-*.safetensors")
    ]
    return sorted(n for n in names if (folder / f"adapters-{n}.json").is_file())


def _check_base(model: nn.Module, meta: dict, where: Path) -> None:
    want = (meta.get("variant"), meta.get("image_size"))
    have = tuple(model.spec.model_id().values())
    if want != have:
        raise ValueError(
            f"adapters {where} were trained on variant {want[0]!r} at image_size={want[1]}, this "
            f"model is {have[0]!r} at image_size={have[1]}: build the base with "
            f"variant={want[0]!r}, image_size={want[1]} (or pass strict_base=False)"
        )
    got = base_weights_hash(model)
    if meta.get("base_hash") != got:
        raise ValueError(
            f"adapters {where} were trained on base weights with hash {meta.get('base_hash')}, "
            f"this model's base hash is {got}: load the base checkpoint they were trained on "
            "(or pass strict_base=False)"
        )


def _inject_missing(
    model: nn.Module, meta: dict, tensors: dict, out: LoadedAdapters, where
) -> None:
    out.injected = restore_adapters(model, _kinds_of(meta), str(where))
    own = model.state_dict()
    missing = [k for k in tensors if k not in own]
    if missing:
        raise ValueError(
            f"{len(missing)} saved adapter tensors have no place in the model (e.g. {missing[:3]}): "
            "register the same prompt sources (model.add_prompt_source) and memory module, and "
            "inject adapters with the saved config (model.add_adapter), before loading"
        )
    bad = [k for k, v in tensors.items() if own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ValueError(
            f"saved adapter tensor {k} is {tuple(tensors[k].shape)}, the model's is "
            f"{tuple(own[k].shape)}: the model's adapters were injected with another config; "
            "build a fresh base and let load_adapters inject them"
        )


def load_adapters(
    model: nn.Module, folder: str | Path, name: str = "default", strict_base: bool = True
) -> LoadedAdapters:
    """Load `folder/adapters-<name>.*` into `model`, injecting missing adapters from the saved
    config. Every saved tensor must land. Checks variant, image size and base hash unless
    `strict_base=False`."""
    from samed2_kit.model.build import read_safetensors

    st_path, json_path = _paths(folder, name)
    for p in (st_path, json_path):
        if not p.is_file():
            found = list_adapter_sets(folder) if Path(folder).is_dir() else []
            raise FileNotFoundError(
                f"adapter file {p} does not exist (adapter sets there: {found})"
            )
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter file {json_path} is unreadable or not valid JSON ({e}): "
                         "re-copy the folder or save the adapters again") from e  # fmt: skip
    if not isinstance(meta, dict):
        raise ValueError(f"adapter file {json_path} is not a JSON object: re-copy the folder "
                         "or save the adapters again")  # fmt: skip
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise ValueError(
            f"{json_path} is not a {FORMAT} file of version <= {VERSION} "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r}): upgrade samed2-kit"
        )
    if meta.get("tensors_sha256") not in (None, hashlib.sha256(st_path.read_bytes()).hexdigest()):
        raise ValueError(f"{st_path} does not match {json_path} (hash differs): save them again")
    if _lora.is_merged(model):
        raise ValueError("LoRA is merged into the weights: unmerge_lora(model) before loading")
    if strict_base:
        _check_base(model, meta, json_path)
    tensors, _ = read_safetensors(
        st_path, "re-copy the folder or save the adapters again", "adapter file "
    )
    out = LoadedAdapters(meta=meta, keys=sorted(tensors))
    _inject_missing(model, meta, tensors, out, json_path)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; kept as a guard
        raise ValueError(f"adapter tensors not loaded: {result.unexpected_keys[:5]}")
    return out
