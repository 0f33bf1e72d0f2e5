"""Volumes: propagate a segmentation from prompted slices through a 3D scan (SAM 2's video path)."""

from samed2_kit.volume.propagate import (
    SlicePrompt,
    model_clip_len,
    propagate_volume,
    volume_intensity,
)

__all__ = ["SlicePrompt", "model_clip_len", "propagate_volume", "volume_intensity"]
