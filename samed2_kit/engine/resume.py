"""What a training checkpoint is bound to, and the check a resume makes against it."""

from __future__ import annotations

from samed2_kit.config import Recipe, to_dict

# recipe keys a resumed run may change: they alter neither the weights so far nor the data order
RESUMABLE_CHANGES = {
    "train": ("steps", "save_every", "keep_last", "log_every", "val_every", "tensorboard"),
    "data": ("num_workers", "spec", "store"),
}


def resume_key(recipe: Recipe) -> dict:
    """The parts of a recipe a checkpoint is bound to (eval and `RESUMABLE_CHANGES` left out)."""
    d = to_dict(recipe)
    d.pop("eval", None)
    d.pop("out_dir", None)
    for section, keys in RESUMABLE_CHANGES.items():
        for k in keys:
            d[section].pop(k, None)
    return d


_ABSENT = object()


def _diff(a, b, default, prefix="") -> list[str]:
    """Differences between the recipe now (`a`) and the checkpoint's (`b`); a key the checkpoint
    lacks (written before the key existed) matches when the recipe keeps its `default`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            d = default.get(k, _ABSENT) if isinstance(default, dict) else _ABSENT
            bk = b.get(k, d) if k not in b and d is not _ABSENT else b.get(k)
            out += _diff(a.get(k), bk, d, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [f"{prefix}: {b!r} in the checkpoint, {a!r} now"]


def check_resume(meta: dict, want: dict, folder) -> None:
    """A clear error when a checkpoint was written by another recipe, model or launch."""
    problems = _diff(want["recipe"], meta.get("recipe", {}), resume_key(Recipe()))
    for key, what in (("frozen_sha256", "the frozen (not trained) weights"),
                      ("world", "the number of processes"), ("samples", "the training data")):  # fmt: skip
        if meta.get(key) != want[key]:
            problems.append(f"{what}: {meta.get(key)!r} in the checkpoint, {want[key]!r} now")
    if problems:
        raise ValueError(
            f"cannot resume from {folder}: it was written by a different run. "
            + "; ".join(problems[:6])
            + ". Resume with the run's recipe and launch, or start a new run (another --out)"
        )
