"""Adapter-only checkpoints: `adapters-<name>.safetensors` (tensors) + `adapters-<name>.json` (config).

What is saved (by name rules, whatever `requires_grad` says): temporal adapters, peft adapters
(LoRA/LoHa/LoKr, every set), and our own prompt sources, their gates and memory module when the
model has them. The JSON records the model variant and image size, each LoRA set's spec and peft
config, the temporal-adapter config, and a SHA-256 of the base weights, so adapters are never
loaded silently onto a base they were not trained on.

    save_adapters(model, "runs/ct", name="ct")
    model = build_model("tiny", checkpoint="sam2.1_hiera_tiny.pt", image_size=512)
    load_adapters(model, "runs/ct", name="ct")      # injects LoRA / temporal adapters as needed
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from samed2_kit.adapters import lora as _lora
from samed2_kit.adapters.freeze import ADAPTER_PATTERN, TEMPORAL_PATTERN
from samed2_kit.utils.atomic import atomic_path, write_text

FORMAT = "samed2-adapters"
VERSION = 1
# state-dict keys of SAMed2Model that are adapters (everything else is the base model)
ADAPTER_KEY = re.compile(rf"{ADAPTER_PATTERN}|^(?:prompt_sources|source_gates|memory)\.")
_TEMPORAL_KEY = re.compile(r"image_encoder\.trunk\.blocks\.(\d+)\.temporal_adapter\.")


@dataclass
class LoadedAdapters:
    """What `load_adapters` did: the JSON it read, the tensors loaded, and what it injected
    (LoRA set names; the TemporalHandle when temporal adapters were added)."""

    meta: dict
    keys: list[str] = field(default_factory=list)
    injected_lora: list[str] = field(default_factory=list)
    temporal: object | None = None


def _paths(folder: str | Path, name: str) -> tuple[Path, Path]:
    _lora.check_name(name)
    folder = Path(folder)
    return folder / f"adapters-{name}.safetensors", folder / f"adapters-{name}.json"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` (state-dict names), detached, contiguous, on CPU."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if ADAPTER_KEY.search(k)
    }


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.sam`'s weights without adapters, under sam2's own names (peft's
    `qkv.base_layer.weight` -> `qkv.weight`): loadable into a plain model of the same variant."""
    if _lora.is_merged(model):
        raise ValueError("LoRA is merged into the base weights: call unmerge_lora(model) first")
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.sam.state_dict().items()
        if not ADAPTER_KEY.search(k)
    }


def has_adapters(model: nn.Module) -> bool:
    return any(ADAPTER_KEY.search(k) for k in model.state_dict())


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


def temporal_config(model: nn.Module) -> dict | None:
    """rank, kernel and blocks of the model's temporal adapters, read from its state dict."""
    sd = model.sam.state_dict()
    blocks = sorted({int(m.group(1)) for k in sd if (m := _TEMPORAL_KEY.search(k))})
    if not blocks:
        return None
    pre = f"image_encoder.trunk.blocks.{blocks[0]}.temporal_adapter."
    return {
        "rank": int(sd[pre + "down.weight"].shape[0]),
        "kernel": int(sd[pre + "conv.weight"].shape[-1]),
        "blocks": blocks,
    }


def _jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(
        json.dumps(obj, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )


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
    sets = {}
    for set_name in _lora.lora_sets(model):
        spec = _lora.lora_spec(model, set_name)
        sets[set_name] = {
            "spec": dataclasses.asdict(spec),
            "peft_config": _jsonable(model.sam.peft_config[set_name].to_dict()),
        }
    adapter_cfg = getattr(model, "adapter_config", None)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "variant": model.spec.variant,
        "image_size": model.spec.image_size,
        "base_hash": base_weights_hash(model),
        "lora": sets,
        "active_lora": _lora.active_lora(model),
        "temporal": temporal_config(model),
        "adapter_config": _jsonable(adapter_cfg) if adapter_cfg is not None else None,
        "prompt_sources": list(getattr(model, "prompt_sources", {}) or {}),
        "memory": getattr(model, "memory", None) is not None,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "extra": _jsonable(extra or {}),
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
    have = (model.spec.variant, model.spec.image_size)
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


def _inject_missing(model: nn.Module, meta: dict, tensors: dict, out: LoadedAdapters) -> None:
    for set_name, entry in (meta.get("lora") or {}).items():
        if set_name not in _lora.lora_sets(model):
            _lora.inject_lora(model, _lora.LoraSpec(**entry["spec"]), adapter_name=set_name)
            out.injected_lora.append(set_name)
    if meta.get("active_lora") in _lora.lora_sets(model):
        _lora.set_active_lora(model, meta["active_lora"])
    cfg = meta.get("temporal")
    has_temporal = any(re.search(TEMPORAL_PATTERN, k) for k in model.state_dict())
    if cfg and not has_temporal:
        try:
            from samed2_kit.adapters.temporal import TemporalAdapterConfig, inject_temporal_adapters
        except ImportError as e:
            raise ValueError(
                "the adapters hold temporal adapters but samed2_kit.adapters.temporal cannot be "
                f"imported ({e}): install a samed2-kit version with temporal adapters"
            ) from e
        out.temporal = inject_temporal_adapters(model, TemporalAdapterConfig(**cfg))
    own = model.state_dict()
    missing = [k for k in tensors if k not in own]
    if missing:
        raise ValueError(
            f"{len(missing)} saved adapter tensors have no place in the model (e.g. {missing[:3]}): "
            "register the same prompt sources (model.add_prompt_source) and memory module, and "
            "inject adapters with the saved config, before loading"
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
    from safetensors.torch import load_file

    st_path, json_path = _paths(folder, name)
    for p in (st_path, json_path):
        if not p.is_file():
            found = list_adapter_sets(folder) if Path(folder).is_dir() else []
            raise FileNotFoundError(
                f"adapter file {p} does not exist (adapter sets there: {found})"
            )
    meta = json.loads(json_path.read_text())
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
    tensors = load_file(str(st_path))
    out = LoadedAdapters(meta=meta, keys=sorted(tensors))
    _inject_missing(model, meta, tensors, out)
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; kept as a guard
        raise ValueError(f"adapter tensors not loaded: {result.unexpected_keys[:5]}")
    return out
