"""Confidence-driven memory (SAMed-2): a bank of compact keys + memory-encoder features of
confident predictions, read through SAM 2 memory attention.

The names below load on first use (PEP 562), so `samed2_kit.memory.cli` (the `samed2 memory`
parser, built on every `samed2` call) does not import torch.
"""

from samed2_kit.utils.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
