"""Volumes: propagate a segmentation from prompted slices through a 3D scan (SAM 2's video path).

Prompts are `samed2_kit.prompts.Prompt`s (or dicts of their fields), in pixels of their slice."""

from samed2_kit.volume.propagate import model_clip_len, propagate_volume, volume_intensity

__all__ = ["model_clip_len", "propagate_volume", "volume_intensity"]
