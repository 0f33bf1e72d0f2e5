"""Batch metadata helpers."""

from __future__ import annotations


def per_image(values, batch: int) -> list | None:
    """Per-clip metadata (B/T values, e.g. task names) repeated to per-image (B); None or an empty
    list give None."""
    values = list(values) if values is not None else []
    if not values:
        return None
    if batch % len(values):
        raise ValueError(f"{len(values)} metadata values for a batch of {batch} images")
    return [v for v in values for _ in range(batch // len(values))]
