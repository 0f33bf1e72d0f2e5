"""Pixel sizes of 2D sources: a `spacing:` value of the spec, or a CSV of sizes by file name
(`spacing_csv:`, e.g. HC18's ``training_set_pixel_size_and_HC.csv``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def spacing_pair(value, where: str) -> tuple[float, float]:
    """One pixel size or (row, col), in mm -> (row, col); ValueError naming `where` otherwise."""
    vals = list(value) if isinstance(value, list | tuple) else [value]
    ok = len(vals) in (1, 2) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in vals
    )
    if not ok:
        raise ValueError(
            f"{where}={value!r}: give the pixel size in mm, one positive number or [row, col]"
        )
    return (float(vals[0]), float(vals[-1]))


def read_spacing_csv(path: str | Path) -> dict[str, float]:
    """Pixel sizes (mm, isotropic) by image file name, from a CSV such as HC18's
    ``training_set_pixel_size_and_HC.csv``.

    Format: comma-separated, a header row, then one row per image. The file-name column is the
    first whose header contains "file", "name" or "image" (any case); the pixel-size column is the
    first whose header contains "pixel" or "spacing" (e.g. ``filename,pixel size(mm)``), in mm
    per pixel, the same along rows and columns. Other columns are ignored. Names may carry a
    folder (only the file name counts).

    Returns:
        {file name as written (folder dropped): pixel size in mm}.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no header, no such columns, a value that is not a positive number, or one
            file name given two different sizes (each naming the CSV and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spacing CSV {path} does not exist (spec key spacing_csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1) if any(c.strip() for c in r)]
    header = [h.strip().lower() for h in rows[0][1]] if rows else []
    name_col = next(
        (i for i, h in enumerate(header) if any(w in h for w in ("file", "name", "image"))), None
    )
    size_col = next((i for i, h in enumerate(header) if "pixel" in h or "spacing" in h), None)
    if name_col is None or size_col is None:
        raise ValueError(
            f"spacing CSV {path} has header {header}: needs a file-name column (header with "
            "'file', 'name' or 'image') and a pixel-size column in mm (header with 'pixel' or "
            "'spacing'), e.g. 'filename,pixel size(mm)'"
        )
    out: dict[str, float] = {}
    for line, r in rows[1:]:
        if len(r) <= max(name_col, size_col):
            raise ValueError(f"spacing CSV {path} line {line}: {len(r)} columns, header has more")
        name = Path(r[name_col].strip().replace("\\", "/")).name
        try:
            mm = float(r[size_col])
        except ValueError:
            mm = float("nan")
        if not (math.isfinite(mm) and mm > 0):
            raise ValueError(
                f"spacing CSV {path} line {line}: pixel size {r[size_col]!r} of {name!r} is not "
                "a positive number of mm"
            )
        if name in out and out[name] != mm:
            raise ValueError(
                f"spacing CSV {path} line {line}: {name!r} has two pixel sizes "
                f"({out[name]} and {mm}); keep one row per image"
            )
        out[name] = mm
    if not out:
        raise ValueError(f"spacing CSV {path} has no rows under its header")
    return out


def spacing_lookup(table: dict[str, float]):
    """A function image file name -> pixel size (mm) or None: the exact name, the name with the
    extension in another case, or the name without its extension."""
    by_key = {}
    for name, mm in table.items():
        by_key.setdefault(name, mm)
        by_key.setdefault(lower_suffix(name), mm)

    def find(name: str) -> float | None:
        for key in (name, lower_suffix(name), Path(name).stem, name.split(".", 1)[0]):
            if key in by_key:
                return by_key[key]
        return None

    return find


def lower_suffix(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{ext.lower()}" if dot and stem else name
