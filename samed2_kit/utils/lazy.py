"""Package attributes that import their module on first use (PEP 562)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, where: dict[str, str], namespace: dict):
    """`(__getattr__, __dir__)` for `package`: name -> its submodule in `where`, imported when
    first read and then kept in `namespace` (the package's globals)."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *where})

    return __getattr__, __dir__
