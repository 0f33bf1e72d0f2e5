"""torch Dataset over a medbank store: clips of T adjacent slices with seeded prompts.

Reads ``STORE/images`` and ``STORE/samples`` (see :mod:`samed2_kit.medbank.schema`) memory-mapped
with ``datasets.load_from_disk``; PNG cells are read as bytes (``Image(decode=False)``) and decoded
with OpenCV. ``collate_clips`` flattens clips into the model's ``(B*T, ...)`` rows, clip-major.

Field of view: where ``images/`` has a ``fov`` column (PNG 0/255 of the image's size; None where
the source has none), each slice's FOV travels with its mask through augmentation and resizing
and comes out as ``valid`` (1 inside); training ignores the pixels outside it (`losses.SegLoss`).
Stores without the column (or with None in every cell) read nothing more and yield all-ones
``valid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from samed2_kit.medbank.pair_dataset import augment_clip, collate
from samed2_kit.medbank.preprocess import normalize_intensity, resize_mask, to_model_input
from samed2_kit.prompts import Prompt, PromptConfig, sample_prompt, scale_prompt

SAMPLE_COLUMNS = (
    "mask", "image_row", "neighbors", "neighbor_samples", "label", "modality", "task",
    "case_id", "slice_index", "spacing", "split",
)  # fmt: skip


def decode_png(cell: dict | None, where: str) -> np.ndarray:
    """Decode an ``Image(decode=False)`` cell ``{"bytes", "path"}`` -> (H, W) grey or (H, W, 3|4)
    RGB(A) array, dtype as stored (uint8; uint16 stays uint16). ``where`` names the cell in errors."""
    import cv2

    data = (cell or {}).get("bytes")
    if data is None and (cell or {}).get("path"):
        path = Path(cell["path"])
        if not path.is_file():
            raise ValueError(f"{where}: image file {path} is gone; rebuild the store")
        data = path.read_bytes()
    if data is None:
        raise ValueError(f"{where}: the cell holds neither bytes nor a path; rebuild the store")
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError(f"{where}: the bytes are not a decodable image; rebuild the store")
    if arr.ndim == 3:  # OpenCV gives BGR(A)
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB if arr.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return arr


def open_store_raw(store_dir: str | Path):
    """A store's ``(images, samples)`` tables (`store.open_store`), PNG columns as raw bytes;
    ``images`` keeps only its ``image`` column, and ``fov`` (field of view) where the store has
    one. ValueError if sample columns are missing."""
    from datasets import Image

    from samed2_kit.medbank.store import open_store

    _, images, samples = open_store(store_dir)
    absent = [c for c in SAMPLE_COLUMNS if c not in samples.column_names]
    if "image" not in images.column_names or absent:
        raise ValueError(
            f"store {store_dir}: missing columns {absent or ['images/image']}; rebuild the store "
            "with this samed2_kit version"
        )
    keep = ["image", "fov"] if "fov" in images.column_names else ["image"]
    images = images.select_columns(keep)
    for name in keep:
        images = images.cast_column(name, Image(decode=False))
    return images, samples.cast_column("mask", Image(decode=False))


def _fov_table(images):
    """``images``' ``fov`` column as a one-column table, or None when the store has no such
    column or every cell is None (then nothing about FOVs is read per item)."""
    if "fov" not in images.column_names:
        return None
    fovs = images.select_columns(["fov"])
    col = fovs.with_format("arrow")[:]["fov"]
    return None if col.null_count == len(col) else fovs


def _select_rows(samples, store, split, tasks, modalities) -> np.ndarray:
    """Sample rows of ``split`` (and of ``tasks`` / ``modalities`` if given), from the columns
    alone (Arrow compute on the memory-mapped table; no image is decoded)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = samples.select_columns(["split", "task", "modality"]).with_format("arrow")[:]
    keep = in_split = pc.fill_null(pc.equal(cols["split"], split), False)
    if not pc.any(keep).as_py():
        splits = sorted(str(s) for s in pc.unique(cols["split"]).to_pylist())
        raise ValueError(
            f"store {store} has no samples of split {split!r}; its splits: {splits}. Pass one "
            "of them, or rebuild the store with that split"
        )
    for name, arg, wanted in (("task", "tasks", tasks), ("modality", "modalities", modalities)):
        if wanted is None:
            continue
        present = set(pc.unique(cols[name].filter(in_split)).to_pylist())
        unknown = sorted(set(wanted) - present)
        if unknown:
            raise ValueError(
                f"store {store}: no {name} {unknown} in split {split!r}; its {name} values "
                f"there: {sorted(map(str, present))}. Fix the {arg}= filter"
            )
        keep = pc.and_(keep, pc.is_in(cols[name], value_set=pa.array(list(wanted), pa.string())))
    rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False)).astype(np.int64)
    if len(rows) == 0:
        raise ValueError(
            f"store {store}: no sample of split {split!r} has both task in {tasks} and "
            f"modality in {modalities}; loosen the tasks/modalities filters"
        )
    return rows


class StoreDataset(torch.utils.data.Dataset):
    """Clips of ``clip_len`` = T adjacent slices from a medbank store, with seeded prompts.

    Item ``i`` is sample row ``rows[i]`` (its split/task/modality selected at construction): the
    T image rows ``neighbors[c - T//2 : c - T//2 + T]`` (c = len(neighbors) // 2; the centre
    slice sits at position T // 2; for even T the extra slice is before it; edge slices repeat as
    stored), decoded (grey -> 3 channels, uint8 / 255) and their masks of the same label from
    ``neighbor_samples`` (-1 -> empty). ``augment``: one seeded flip/affine/intensity draw
    (``augment_clip``, rng ``[seed, epoch, i, 1]``) applied to all T slices. The prompt comes
    from the centre mask (rng ``[seed, epoch, i]``; an empty mask gets a full-image box) and
    serves every slice. Call ``set_epoch`` every epoch (DataLoader workers: not persistent).

    Keys: ``image`` (T, 3, S, S) float32 ImageNet-normalised; ``mask`` (T, 1, S, S) float32
    {0, 1}; ``box`` (4,) float32 xyxy in S-space (zeros unless ``has_box``); ``points`` (N, 2)
    float32 xy in S-space; ``point_labels`` (N,) int64; ``orig_hw`` (H, W) of the stored image;
    ``spacing`` (z, y, x) mm; ``slice_index`` of the centre; ``case_id``, ``sample_id``
    (``"{case_id}#{label}@{slice_index}"``), ``task``, ``label``, ``modality``; ``seed`` an
    int drawn from rng ``[seed, epoch, i, 2]``: the item's own stream (training's corrective
    clicks, `engine.clicks`); ``valid`` (T, 1, S, S) float32 {0, 1}: each slice's field of view
    (``images/`` column ``fov``), flipped, warped and resized exactly like its mask; all ones
    where the slice has no FOV or the store has no ``fov`` column (then nothing is decoded).
    """

    def __init__(
        self,
        store_dir: str | Path,
        split: str = "train",
        clip_len: int = 1,
        image_size: int = 256,
        prompt: PromptConfig | None = None,
        seed: int = 0,
        augment: bool = False,
        tasks: list[str] | None = None,
        modalities: list[str] | None = None,
    ) -> None:
        self.store_dir, self.split, self.clip_len = Path(store_dir), split, int(clip_len)
        self.image_size, self.prompt = int(image_size), prompt or PromptConfig()
        self.seed, self.augment, self.epoch = int(seed), augment, 0
        if self.clip_len < 1:
            raise ValueError(f"clip_len={clip_len}: a clip has at least 1 slice")
        images, self._samples = open_store_raw(self.store_dir)
        self._images = images.select_columns(["image"])
        self._fovs = _fov_table(images)
        self._masks = self._samples.select_columns(["mask"])
        self.rows = _select_rows(self._samples, self.store_dir, split, tasks, modalities)
        self._check_clip_len()

    def _check_clip_len(self) -> None:
        import pyarrow.compute as pc

        nb = self._samples.select_columns(["neighbors"]).with_format("arrow")["neighbors"]
        have = pc.min(pc.list_value_length(nb).take(self.rows)).as_py()
        need = 2 * (self.clip_len // 2) + 1
        if have < need:
            raise ValueError(
                f"clip_len={self.clip_len} (data.clip_len, or data.sequence_len with "
                f"train.step=sequence) needs {need} neighbours per sample, but the store "
                f"{self.store_dir} has {have} (clip_radius {have // 2}): use clip_len <= {have}, "
                f"or rebuild it with clip_radius >= {self.clip_len // 2}"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def column(self, name: str) -> list:
        """Column `name` of this dataset's samples, in item order (nothing is decoded)."""
        return self._samples.select_columns([name]).select(self.rows).to_dict()[name]  # Arrow

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, table, column: str, rows: Sequence[int], where: str) -> dict:
        """Decode the PNG ``column`` of ``rows`` (those >= 0, each once) -> {row: array}."""
        uniq = sorted({int(r) for r in rows if r >= 0})
        cells = table[uniq][column] if uniq else []
        return {
            r: decode_png(c, f"{where}, {column} of row {r}")
            for r, c in zip(uniq, cells, strict=True)
        }

    def _decode_fovs(self, rows: Sequence[int], hw: tuple[int, int], where: str) -> list | None:
        """Each image row's field of view (H, W) bool (> 127 inside; None where the row has
        none), in ``rows`` order; None when no row has one or the store has no ``fov`` column."""
        if self._fovs is None:
            return None
        uniq = sorted({int(r) for r in rows})
        cells = dict(zip(uniq, self._fovs[uniq]["fov"], strict=True))
        if all(cells[r] is None for r in uniq):
            return None
        by_row = {}
        for r, cell in cells.items():
            if cell is None:
                by_row[r] = None
                continue
            fov = decode_png(cell, f"{where}, fov of image row {r}")
            fov = fov[..., 0] if fov.ndim == 3 else fov
            if fov.shape != hw:
                raise ValueError(
                    f"{where}: the fov of image row {r} is {fov.shape[0]}x{fov.shape[1]}, its "
                    f"image {hw[0]}x{hw[1]}: a field of view must have its image's size; "
                    "rebuild the store"
                )
            by_row[r] = fov > 127
        return [by_row[int(r)] for r in rows]

    def __getitem__(self, i: int) -> dict:
        i = range(len(self.rows))[i]
        row, size, t = int(self.rows[i]), self.image_size, self.clip_len
        s = self._samples[row]
        where = f"store {self.store_dir} sample {row} ({s['case_id']} slice {s['slice_index']})"
        start = len(s["neighbors"]) // 2 - t // 2
        img_rows = s["neighbors"][start : start + t]
        mask_rows = list(s["neighbor_samples"][start : start + t])
        mask_rows[t // 2] = row  # the centre is the sample itself
        by_row = self._decode(self._images, "image", img_rows, where)
        masks_by_row = {
            r: m > 0 for r, m in self._decode(self._masks, "mask", mask_rows, where).items()
        }
        h, w = masks_by_row[row].shape
        bad = [r for r, x in by_row.items() if x.shape[:2] != (h, w)]
        if bad:
            raise ValueError(
                f"{where}: image rows {bad} are not {h}x{w} like its mask; all slices of a case "
                "must have one size: rebuild the store"
            )
        by_row = {r: normalize_intensity(x, "2d") for r, x in by_row.items()}
        images = [by_row[r] for r in img_rows]
        masks = [masks_by_row[r] if r >= 0 else np.zeros((h, w), bool) for r in mask_rows]
        fovs = self._decode_fovs(img_rows, (h, w), where)
        if fovs is not None:
            fovs = [np.ones((h, w), bool) if f is None else f for f in fovs]
        if self.augment:  # the FOVs ride along as extra masks: the same draw, the same geometry
            rng = np.random.default_rng([self.seed, self.epoch, i, 1])
            images, both = augment_clip(images, masks + (fovs or []), rng, ref=t // 2)
            masks, fovs = both[:t], (both[t:] if fovs is not None else None)
        centre, rng = masks[t // 2], np.random.default_rng([self.seed, self.epoch, i])
        full = Prompt(box=np.array([0, 0, w - 1, h - 1], np.float32))
        p = scale_prompt(
            sample_prompt(centre, self.prompt, rng) if centre.any() else full, (h, w), size
        )
        box = p.box if p.box is not None else np.zeros(4, np.float32)
        points = p.points if p.points is not None else np.zeros((0, 2), np.float32)
        labels = p.labels if p.labels is not None else np.zeros(0, np.int64)
        valid = (torch.ones(t, 1, size, size) if fovs is None else
                 torch.stack([resize_mask(np.ascontiguousarray(f), size) for f in fovs]))  # fmt: skip
        return {
            "image": torch.stack([to_model_input(np.asarray(x, np.float32), size) for x in images]),
            "mask": torch.stack([resize_mask(np.ascontiguousarray(m), size) for m in masks]),
            "valid": valid,
            "box": torch.from_numpy(box), "has_box": p.box is not None,
            "points": torch.from_numpy(points), "point_labels": torch.from_numpy(labels),
            "orig_hw": (h, w), "spacing": tuple(float(v) for v in s["spacing"]),
            "case_id": s["case_id"], "task": s["task"], "label": s["label"],
            "sample_id": f"{s['case_id']}#{s['label']}@{s['slice_index']}",
            "modality": s["modality"], "slice_index": int(s["slice_index"]),
            "seed": int(np.random.default_rng([self.seed, self.epoch, i, 2]).integers(2**62)),
        }  # fmt: skip


def collate_clips(batch: Sequence[dict]) -> dict:
    """Batch B :class:`StoreDataset` clips of T slices into the model's layout, clip-major (row
    ``b * T + t`` is clip b's slice t): ``image`` (B*T, 3, S, S), ``mask`` (B*T, 1, S, S);
    each clip's prompt repeated over its slices: ``box`` (B*T, 4), ``has_box`` (B*T,),
    ``points`` (B*T, N, 2) and ``point_labels`` (B*T, N), padded to the largest N with label -1;
    per clip: ``orig_hw`` (B, 2) int64, ``spacing`` (B, 3) float64 mm, ``slice_index`` (B,)
    int64 (centre slices), ``seed`` (B,) int64 (the clip's own random stream), strings as
    lists of length B; ``clip_len`` T (int); ``valid`` (B*T, 1, S, S) float32 {0, 1}, the
    slices' fields of view, only when some pixel of the batch lies outside one (without it a
    batch is trained on every pixel, exactly as before FOVs existed). With T = 1 the
    keys of ``pair_dataset.collate`` have its shapes (``spacing`` has 3 values, not 2)."""
    t = int(batch[0]["image"].shape[0])
    if any(b["image"].shape[0] != t for b in batch):
        lens = [int(b["image"].shape[0]) for b in batch]
        raise ValueError(f"collate_clips: clips of different lengths {lens}; use one clip_len")
    out = collate([{**b, "image": b["image"][0], "mask": b["mask"][0]} for b in batch])
    out["image"] = torch.cat([b["image"] for b in batch])
    out["mask"] = torch.cat([b["mask"] for b in batch])
    for key in ("box", "has_box", "points", "point_labels"):
        out[key] = out[key].repeat_interleave(t, dim=0)
    out["slice_index"] = torch.tensor([b["slice_index"] for b in batch], dtype=torch.int64)
    out["seed"] = torch.tensor([b["seed"] for b in batch], dtype=torch.int64)
    out["clip_len"] = t
    if any("valid" in b and bool((b["valid"] < 1).any()) for b in batch):
        out["valid"] = torch.cat([b.get("valid", torch.ones_like(b["mask"])) for b in batch])
    if "support_image" in batch[0]:  # few-shot episodes (`engine.episodes`)
        for key in ("support_image", "support_mask"):
            out[key] = torch.stack([b[key] for b in batch])
        out["support_id"] = [b["support_id"] for b in batch]
    return out
