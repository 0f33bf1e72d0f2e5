"""Ways to damage saved files in tests: a small memory bank, a safetensors file rewritten with one
tensor (and its JSON header) changed."""

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def memory_bank(path):
    """A 3-entry confidence memory bank (test-tiny at 64 px) saved at `path`."""
    from samed2_kit.memory import ConfidenceMemory, Entry, MemoryConfig

    gen = torch.Generator().manual_seed(0)
    bank = ConfidenceMemory(MemoryConfig(threshold=0.0), {"variant": "test-tiny", "image_size": 64})
    for i in range(3):
        key = torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0)
        bank.add(Entry(key, torch.randn(4, 2, 2, generator=gen), 0.9, "ct", "liver", f"c{i}"))
    bank.save(path)
    return bank


def rewrite_safetensors(path, key, change, header_change=None):
    """Re-save a safetensors file with tensor `key` changed (and its JSON header)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    change(tensors[key])
    if header_change is not None:
        name = next(iter(meta))
        header = json.loads(meta[name])
        header_change(header)
        meta = {name: json.dumps(header)}
    save_file(tensors, str(path), metadata=meta)
