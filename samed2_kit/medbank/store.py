"""Open, summarise and verify a medbank store."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from samed2_kit.medbank.schema import IMAGES_DIR, MANIFEST, SAMPLES_DIR


def default_store(out_dir: str | Path) -> Path:
    """The store a run builds and reads when its recipe names none: `<out_dir>-store`, a sibling
    of the run folder (runs/exp1 -> runs/exp1-store)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + "-store")


def open_store(path: str | Path):
    """(manifest dict, images Dataset, samples Dataset), memory-mapped. ValueError when `path` is
    not a store (or does not exist), was written with another schema version, or has a damaged
    file (named, with the fix)."""
    from samed2_kit.medbank.schema import SCHEMA_VERSION

    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{path} is not a medbank store (it does not exist): build one with "
            f"`samed2 medbank build SPEC --out {path}`"
        )
    missing = [p for p in (MANIFEST, IMAGES_DIR, SAMPLES_DIR) if not (path / p).exists()]
    if missing:
        raise ValueError(
            f"{path} is not a medbank store (missing {missing}): build one with "
            "`samed2 medbank build SPEC --out DIR`"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(
            f"store {path}: {path / MANIFEST} is not valid JSON ({e}): the store is corrupt; "
            f"rebuild it with `samed2 medbank build SPEC --out {path}`"
        ) from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"store {path}: {MANIFEST} schema_version {version}, this samed2_kit reads "
            f"{SCHEMA_VERSION}; rebuild the store with this version"
        )
    return manifest, _load_table(path, IMAGES_DIR), _load_table(path, SAMPLES_DIR)


def _load_table(store: Path, name: str):
    """One table of a store, memory-mapped; ValueError naming the damaged file (a truncated or
    corrupt Arrow shard, a broken state.json) and the fix."""
    from datasets import load_from_disk

    folder = store / name
    try:
        return load_from_disk(str(folder))
    except Exception as e:  # pyarrow raises OSError / ArrowInvalid; datasets, JSON errors
        bad = _damaged_file(folder) or folder
        raise ValueError(
            f"store {store}: {bad} is truncated or corrupt ({type(e).__name__}: {e}); rebuild the "
            f"store with `samed2 medbank build SPEC --out {store}`"
        ) from e


def _damaged_file(folder: Path) -> Path | None:
    """The first file of a saved table that does not read back, if any is found."""
    import pyarrow as pa

    for meta in ("state.json", "dataset_info.json"):
        try:
            json.loads((folder / meta).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return folder / meta
    for shard in sorted(folder.glob("*.arrow")):
        try:
            with pa.memory_map(str(shard)) as source:
                pa.ipc.open_stream(source).read_all()
        except (OSError, pa.ArrowException, ValueError):
            return shard
    return None


def info_table(path: str | Path) -> str:
    """Sample counts by modality / task / split, as a Markdown table."""
    manifest, images, samples = open_store(path)
    cols = samples.select_columns(["modality", "task", "split", "case_id"]).to_pandas()
    splits = sorted(cols["split"].unique())
    lines = [
        f"store {path}: {manifest.get('name', '?')}, {len(images)} images, {len(samples)} "
        f"samples, {cols['case_id'].nunique()} cases, built by {manifest.get('tool', '?')}",
        "",
        "| modality | task | " + " | ".join(splits) + " | cases | total |",
        "| --- | --- | " + " | ".join("---" for _ in splits) + " | --- | --- |",
    ]
    for (mod, task), g in cols.groupby(["modality", "task"]):
        by = g["split"].value_counts()
        cells = " | ".join(str(int(by.get(s, 0))) for s in splits)
        lines.append(f"| {mod} | {task} | {cells} | {g['case_id'].nunique()} | {len(g)} |")
    tot = cols["split"].value_counts()
    lines.append(
        "| **all** | | "
        + " | ".join(str(int(tot.get(s, 0))) for s in splits)
        + f" | {cols['case_id'].nunique()} | {len(cols)} |"
    )
    if manifest.get("skipped"):
        lines += [
            "",
            f"{len(manifest['skipped'])} inputs were skipped at build (see manifest.json)",
        ]
    return "\n".join(lines)


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def stream_rows(store: Path, name: str, batch: int = 512):
    """The rows of table `name` of a store as dicts, read from its Arrow files in record batches
    (not memory-mapped: memory stays flat however large the store); image cells are
    {"bytes", "path"}. ValueError naming a file that does not read."""
    import pyarrow as pa

    folder = Path(store) / name
    files = json.loads((folder / "state.json").read_text())["_data_files"]
    for entry in files:
        path = folder / entry["filename"]
        try:
            with pa.OSFile(str(path)) as source:
                for record in pa.ipc.open_stream(source):
                    for start in range(0, record.num_rows, batch):
                        yield from record.slice(start, batch).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise ValueError(
                f"store {store}: {path} is truncated or corrupt ({e}); rebuild the store with "
                f"`samed2 medbank build SPEC --out {store}`"
            ) from e


def png_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) from a PNG's header (IHDR), without decoding it; None when `data` is no PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")


def verify(path: str | Path, progress: bool = True) -> VerifyResult:
    """Every mask matches its image's size and area, no case in two splits, references valid,
    content hashes and counts equal to the manifest's. Reads the store once, streamed (memory
    stays flat); images are checked by their PNG headers, masks decoded."""
    import hashlib

    import cv2
    import numpy as np
    from tqdm.auto import tqdm

    from samed2_kit.medbank.build import row_digest
    from samed2_kit.medbank.schema import FOV

    path = Path(path)
    manifest, images, samples = open_store(path)  # checks the files and the schema version
    res = VerifyResult()
    sizes, img_split, img_case, sha = [], [], [], hashlib.sha256()
    rows = stream_rows(path, IMAGES_DIR)
    for row in tqdm(rows, total=len(images), desc="verify images", disable=not progress):
        sha.update(row_digest(row, "image"))
        sizes.append(png_size(row["image"]["bytes"]))
        img_split.append(row["split"])
        img_case.append(row["case_id"])
        if row.get(FOV) is not None and png_size(row[FOV]["bytes"]) != sizes[-1]:
            res.problems.append(
                f"image {len(sizes) - 1}: fov size {png_size(row[FOV]['bytes'])} != image "
                f"{sizes[-1]}"
            )
    hashes = manifest.get("content_sha256") or {}
    if sha.hexdigest() != hashes.get(IMAGES_DIR):
        res.problems.append("images: content hash differs from manifest.json (modified or corrupt)")
    case_split: dict[str, set] = {}
    counted: Counter = Counter()
    sha = hashlib.sha256()
    rows = stream_rows(path, SAMPLES_DIR)
    for i, row in enumerate(
        tqdm(rows, total=len(samples), desc="verify samples", disable=not progress)
    ):
        sha.update(row_digest(row, "mask"))
        counted[(row["modality"], row["task"], row["split"])] += 1
        mask = cv2.imdecode(np.frombuffer(row["mask"]["bytes"], np.uint8), cv2.IMREAD_UNCHANGED)
        r = row["image_row"]
        if not 0 <= r < len(sizes):
            res.problems.append(f"sample {i}: image_row {r} out of range")
            continue
        if mask is None or sizes[r] is None or mask.shape[:2] != sizes[r]:
            res.problems.append(
                f"sample {i}: mask size {None if mask is None else mask.shape} != image {sizes[r]}"
            )
        if mask is not None and int((mask > 0).sum()) != row["mask_area"]:
            res.problems.append(f"sample {i}: mask_area {row['mask_area']} != mask pixels")
        for n in row["neighbors"]:
            if not 0 <= n < len(sizes) or img_case[n] != row["case_id"]:
                res.problems.append(
                    f"sample {i}: neighbour image {n} is not of case {row['case_id']}"
                )
        if img_split[r] != row["split"] or img_case[r] != row["case_id"]:
            res.problems.append(f"sample {i}: split/case differ from its image row {r}")
        case_split.setdefault(row["case_id"], set()).add(row["split"])
    if sha.hexdigest() != hashes.get(SAMPLES_DIR):
        res.problems.append(
            "samples: content hash differs from manifest.json (modified or corrupt)"
        )
    leaks = {c: sorted(s) for c, s in case_split.items() if len(s) > 1}
    res.problems += [f"case {c} is in several splits: {s}" for c, s in leaks.items()]
    want = {
        (c["modality"], c["task"], c["split"]): c["samples"] for c in manifest.get("counts") or []
    }
    if dict(counted) != want:
        res.problems.append(f"counts differ from manifest.json: store {dict(counted)} vs {want}")
    res.checked = {"images": len(images), "samples": len(samples), "cases": len(case_split)}
    return res


def spacing_unknown(manifest: dict) -> set[str]:
    """Case ids whose pixel size the sources did not give (spacing 1 per original pixel): their
    distances are in pixels, not mm. Stores built before this was recorded: none."""
    return {c for src in manifest.get("sources", []) for c in src.get("spacing_unknown", [])}
