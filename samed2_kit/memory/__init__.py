"""Confidence-driven memory (SAMed-2): a bank of compact keys + memory-encoder features of
confident predictions, read through SAM 2 memory attention."""

from samed2_kit.memory.bank import ConfidenceMemory, Entry, MemoryConfig
from samed2_kit.memory.module import MEMORY_FILE, MemoryConditioner, attach_memory

__all__ = [
    "MEMORY_FILE",
    "ConfidenceMemory",
    "Entry",
    "MemoryConditioner",
    "MemoryConfig",
    "attach_memory",
]
