"""Shared checks for voxel arrays (finite values, integer label maps) and label-name files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def check_finite(arr: np.ndarray, source: str | Path) -> None:
    """Raise ValueError naming `source` and the count when a float array holds NaN/inf voxels."""
    if arr.dtype.kind not in "fc":
        return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"{source}: {bad} of {arr.size} voxels are NaN or infinite; fix the file (e.g. replace "
            "them with the background value) before reading it"
        )


def to_label_array(arr: np.ndarray, source: str | Path) -> np.ndarray:
    """Return `arr` as an integer label map (same shape).

    Integer and bool arrays come back unchanged (bool as uint8). Float arrays must hold only
    finite whole numbers; they are cast to int32 (int64 if a value does not fit).

    Raises:
        ValueError: NaN/inf voxels (with the count) or a non-integer value (with an example),
            naming `source`.
    """
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind not in "f":
        raise ValueError(f"{source}: label map has dtype {arr.dtype}; expected integers")
    check_finite(arr, source)
    frac = arr[arr != np.round(arr)]
    if frac.size:
        raise ValueError(
            f"{source}: label map holds non-integer values (e.g. {float(frac.flat[0])!r}, "
            f"{frac.size} voxels); labels must be whole numbers: is this an image rather than a "
            "label map? Read it with labels=False."
        )
    if arr.size == 0:
        return arr.astype(np.int32)
    lo, hi = float(arr.min()), float(arr.max())
    info = np.iinfo(np.int32)
    return arr.astype(np.int32 if info.min <= lo and hi <= info.max else np.int64)


def load_label_names(json_path: str | Path, key: str | None = None) -> dict[int, str]:
    """Read a label id -> name table from JSON.

    Accepts a flat ``{"1": "spleen", ...}`` table, or a table of tables selected by `key`
    (TotalSegmentator's ``label_map_total_and_total_mr.json`` holds ``{"total": {...},
    "total_mr": {...}}``: pass ``key="total"`` for CT, ``key="total_mr"`` for MR).

    Returns:
        {label id (int): name}, without the background id 0 unless the file lists it.

    Raises:
        ValueError: `key` missing (lists the keys found), non-integer ids or non-string names.
    """
    json_path = Path(json_path)
    with open(json_path, encoding="utf-8") as fh:
        table = json.load(fh)
    if not isinstance(table, dict):
        raise ValueError(f"{json_path}: expected a JSON object of id -> name, got {type(table)}")
    if key is not None:
        if key not in table:
            raise ValueError(
                f"{json_path}: no label table {key!r}; keys found: {sorted(table)}. "
                "Pass one of them as key."
            )
        table = table[key]
    elif table and all(isinstance(v, dict) for v in table.values()):
        raise ValueError(
            f"{json_path} holds several label tables {sorted(table)}: pass key= to pick one"
        )
    names: dict[int, str] = {}
    for k, v in table.items():
        try:
            label_id = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"{json_path}: label id {k!r} is not an integer") from None
        if not isinstance(v, str):
            raise ValueError(f"{json_path}: name of label {k} is {v!r}, expected a string")
        names[label_id] = v
    return names
