"""Typed dataclasses from plain mappings (YAML/JSON), and back; imports nothing but the standard
library (and PyYAML inside `apply_overrides`).

    cfg = from_dict(TrainConfig, {"steps": 50}, "train", "recipes/a.yaml")
    data = to_dict(cfg)

Unknown keys are errors that name the key, the file and the nearest valid key. Values are
coerced by the field's type hint (numbers, bools, lists, dicts, nested dataclasses, Optional).
A field whose metadata holds `kinds` (a callable giving {name: config dataclass}) is a mapping
from a registered kind's name to its config (e.g. `adapters: {temporal: {rank: 8}}`); a null
value leaves that kind out.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp, True
    return tp, False


def _unknown(key, valid: list[str], where: str, source: str) -> ValueError:
    near = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ValueError(f"unknown key '{where}' in {source}{hint} (valid: {', '.join(valid)})")


def _coerce_number(value, tp, where: str, source: str):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} in {source} must be a number, got {value!r}")
    if tp is int and float(value) != int(value):
        raise ValueError(f"{where} in {source} must be an integer, got {value!r}")
    return tp(value)


def _coerce_dict(value, tp, where: str, source: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} in {source} must be a mapping, got {value!r}")
    kt, vt = typing.get_args(tp) or (Any, Any)
    out = {}
    for k, v in value.items():
        if kt is int and isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)  # JSON-style "1": name
        out[_coerce(k, kt, f"{where} key {k!r}", source)] = _coerce(v, vt, f"{where}.{k}", source)
    return out


def _coerce(value: Any, tp, where: str, source: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} in {source} must not be empty")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where} in {source} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if origin is dict or tp is dict:
        return _coerce_dict(value, tp, where, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} in {source} must be true or false, got {value!r}")
    if tp in (int, float):
        return _coerce_number(value, tp, where, source)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a bool: give the word back
            return "yes" if value else "no"
        return str(value)
    return value


def _coerce_kinds(value, kinds: dict[str, type], where: str, source: str) -> dict:
    """{kind name: its config} for a registry-typed field; null entries are left out."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where} in {source} must be a mapping of names, got {value!r}")
    out = {}
    for name, sub in value.items():
        if name not in kinds:
            raise _unknown(name, sorted(kinds), f"{where}.{name}", source)
        if sub is None:
            continue
        cls = kinds[name]
        out[name] = sub if isinstance(sub, cls) else from_dict(cls, sub, f"{where}.{name}", source)
    return out


def from_dict(cls, data: dict | None, where: str = "", source: str = "<recipe>"):
    """Build dataclass `cls` from a mapping; unknown keys are a ValueError naming the nearest."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'recipe'} in {source} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise _unknown(key, list(fields), full, source)
        kinds = fields[key].metadata.get("kinds")
        if kinds is not None:
            kwargs[key] = _coerce_kinds(value, kinds(), full, source)
        else:
            kwargs[key] = _coerce(value, hints[key], full, source)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.init
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        keys = ", ".join(f"{where}.{n}" if where else n for n in missing)
        raise ValueError(f"{source}: {keys} missing: add {'it' if len(missing) == 1 else 'them'}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if source in str(e):
            raise
        raise ValueError(f"{source}: {e}") from e


def to_dict(obj) -> dict:
    """A dataclass (nested dataclasses, lists, dicts) as plain JSON-able data."""
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: {key.strip()!r} is not a key (e.g. train.steps)")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or a section left empty (`memory:`)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(
                f"override {item!r}: the value {raw!r} is not valid YAML ({problem}): quote it, "
                f"e.g. {key.strip()}='\"{raw}\"', or fix the brackets"
            ) from e
    return data
