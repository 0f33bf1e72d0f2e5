"""`ModelSpec`: what rebuilds a model's architecture, saved in its manifest (no torch here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelSpec:
    """variant: a `samed2_kit.model.build.VARIANTS` name; image_size: input side in px (a
    multiple of 32); clip_len: T adjacent slices per clip the encoder was trained with (1 for
    2D; volume propagation encodes clips of T slices)."""

    variant: str = "test-tiny"
    image_size: int = 1024
    clip_len: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model spec") -> ModelSpec:
        """From `to_dict`'s output; a missing field is a ValueError naming it."""
        for key in ("variant", "image_size"):
            if key not in data:
                raise ValueError(f"{where} lacks the field '{key}': re-save the model")
        return cls(str(data["variant"]), int(data["image_size"]), int(data.get("clip_len") or 1))

    def model_id(self) -> dict:
        """{variant, image_size}: what memory banks, prompt-source files and adapter files are
        bound to (clip_len left out: it does not change any tensor's shape)."""
        return {"variant": self.variant, "image_size": self.image_size}
