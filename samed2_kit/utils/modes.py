"""Module modes as context managers: a mode set for a block and restored after it, error or not."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def restored_modes(module) -> Iterator:
    """Every submodule's training flag restored after the block (the block may change them)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def evaluation(module) -> Iterator:
    """`module.eval()` for the block; every submodule's own training flag restored afterwards."""
    with restored_modes(module):
        module.eval()
        yield module
