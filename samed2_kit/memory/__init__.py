"""Confidence-driven memory (SAMed-2): a bank of compact keys + memory-encoder features of
confident predictions, read through SAM 2 memory attention.

The names below load on first use (PEP 562), so `samed2_kit.memory.cli` (the `samed2 memory`
parser, built on every `samed2` call) does not import torch.
"""

import importlib

_WHERE = {
    "ConfidenceMemory": "bank",
    "Entry": "bank",
    "MemoryConfig": "bank",
    "MEMORY_FILE": "module",
    "MemoryConditioner": "module",
    "attach_memory": "module",
}

__all__ = [
    "MEMORY_FILE",
    "ConfidenceMemory",
    "Entry",
    "MemoryConditioner",
    "MemoryConfig",
    "attach_memory",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
