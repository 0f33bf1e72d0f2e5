"""One browser tab's work, without any GUI: the opened image or volume, the prompts of each
slice, the masks, undo, propagation, few-shot, downloads and "save as training example".

The mask of a slice is a function of its prompts (its clicks and box), never of earlier masks:
`predict` with the same prompts gives it again (`samed2 predict` with the prompts file
`prompts_json` writes, or `Predictor.predict`), which keeps undo exact and results reproducible.
One click without a box asks for SAM's three candidates and shows the best scored; `choose` takes
another (kept with the prompt, so undo restores it). That single-click case is the one exception to
reproducibility: `samed2 predict` and propagation decode one click with `multimask_output=False`
(SAM 2's single mask, the best of three only when it is unstable), and the prompts file does not
record a chosen candidate; two clicks or a box reproduce exactly. A 2D image is encoded as
`Predictor.set_image` encodes it; a volume's slices go through one intensity mapping for the whole
volume (`volume_intensity`, as propagation does) and are encoded when first clicked (one encoder
run per slice, then every click is decoder only).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MODES = ("positive", "negative", "box")
SEG_LABELS = {1: "samed2 prediction"}  # the DICOM-SEG segment (as `samed2 predict` names it)


@dataclass
class SlicePrompt:
    """One slice's prompt: clicks [(x, y)] in image pixels with labels 1 / 0, a box (x0, y0, x1,
    y1), and `corner`, the first corner of a box being drawn (two clicks make a box); `choice`,
    the candidate taken with `Session.choose` (None: the best scored; not in the prompts file)."""

    points: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    box: list | None = None
    corner: list | None = None
    choice: int | None = None

    def empty(self) -> bool:
        return not self.points and self.box is None

    def fields(self) -> dict:
        """The entry of a `samed2 predict` prompts file."""
        out: dict = {}
        if self.box is not None:
            out["box"] = [round(float(v), 2) for v in self.box]
        if self.points:
            out["points"] = [[round(float(x), 2), round(float(y), 2)] for x, y in self.points]
            out["labels"] = [int(v) for v in self.labels]
        return out


def _ranges(zs) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, zs = [], list(zs)
    for i, z in enumerate(zs):
        if i == 0 or z != zs[i - 1] + 1:
            out.append([z, z])
        else:
            out[-1][1] = z
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


class Session:
    """A tab's state; `engine` (app.engine.Engine) is shared, the predictor is the tab's own."""

    def __init__(self, engine, workdir: Path):
        self.engine, self.workdir = engine, Path(workdir)
        self.predictor = None  # made on the first click (holds this tab's embedding)
        self._few_shot = None  # a torch Predictor holding the support (set_support)
        self.opened = None
        self.pending, self.series = None, []  # a DICOM folder/zip of several series: [(uid, label)]
        self.last_ms: float | None = None  # server time of the last click's prediction
        self.last_encode_ms: float | None = None
        self.fresh_encode = False  # whether the last click ran the encoder (a new slice)

    # -- opening -------------------------------------------------------------------------------
    def open(self, opened, modality: str = "auto", window=None) -> None:
        """Show `opened` (app.files.Opened); forgets the previous image's prompts and masks."""
        from samed2_kit.medbank.preprocess import normalize_intensity
        from samed2_kit.predict import volume_modality
        from samed2_kit.volume.propagate import volume_intensity

        arr = opened.volume.array
        if opened.kind == "image":
            img = arr[0]
            view = normalize_intensity(img, modality, window)
            self._slice01 = lambda z: view
        else:
            modality = volume_modality(opened.volume, modality, window, self.engine.trained_on)
            self._slice01 = volume_intensity(arr, modality, window)
        self.opened, self.modality, self.window = opened, modality, window
        self.z = arr.shape[0] // 2
        self.masks = np.zeros(arr.shape[:3], dtype=bool)
        self.prompts: dict[int, SlicePrompt] = {}
        self.history: list[tuple[int, SlicePrompt | None]] = []
        self.candidates: tuple[np.ndarray, np.ndarray] | None = None
        self.choice, self.propagated, self._encoded = 0, False, None

    def _need(self):
        if self.opened is None:
            raise ValueError(
                "open an image or a volume first (upload one, or pick one from --data)"
            )
        return self.opened

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, H, W) of the opened image (Z = 1 for a 2D image)."""
        return tuple(self._need().volume.array.shape[:3])

    @property
    def prompt(self) -> SlicePrompt:
        return self.prompts.get(self.z, SlicePrompt())

    # -- prompting -----------------------------------------------------------------------------
    def goto(self, z: int) -> None:
        n = self.shape[0]
        self.z, self.candidates = int(min(max(int(z), 0), n - 1)), None

    def click(self, x: float, y: float, mode: str = "positive") -> None:
        """A click at image pixel (x, y): a point (mode "positive"/"negative") or a box corner
        ("box": the first click starts the box, the second closes it); then the slice's mask."""
        _, h, w = self.shape
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {list(MODES)}")
        if not (np.isfinite([x, y]).all() and -0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
            raise ValueError(f"the click ({x:.1f}, {y:.1f}) is outside the {w} x {h} image: "
                             "click on the image")  # fmt: skip
        x, y = float(min(max(x, 0), w - 1)), float(min(max(y, 0), h - 1))
        old = self.prompts.get(self.z)
        sp = copy.deepcopy(old) if old is not None else SlicePrompt()
        if mode == "box" and sp.corner is None:
            sp.corner = [x, y]
        elif mode == "box":
            (x0, x1), (y0, y1) = sorted((sp.corner[0], x)), sorted((sp.corner[1], y))
            if x1 - x0 < 1 or y1 - y0 < 1:
                raise ValueError("the box's two corners are less than a pixel apart: click the "
                                 "opposite corner of the object")  # fmt: skip
            sp.box, sp.corner = [x0, y0, x1, y1], None
        else:
            sp.points.append([x, y])
            sp.labels.append(1 if mode == "positive" else 0)
        self.history.append((self.z, old))
        self.prompts[self.z] = sp
        self._predict_slice()

    def undo(self) -> None:
        """Back to the prompts before the last click (on whichever slice it was)."""
        if not self.history:
            raise ValueError("nothing to undo")
        z, old = self.history.pop()
        self.z = z
        if old is None:
            self.prompts.pop(z, None)
        else:
            self.prompts[z] = old
        self._predict_slice()

    def clear(self) -> None:
        """Forget every prompt and mask of the opened image (it stays open and encoded)."""
        self._need()
        self.prompts.clear()
        self.history.clear()
        self.masks[:] = False
        self.candidates, self.propagated = None, False

    def choose(self, k: int) -> None:
        """Take candidate k (of the three a single click gives) as the slice's mask."""
        if self.candidates is None or not 0 <= k < len(self.candidates[1]):
            raise ValueError("no such candidate: candidates come with a single click")
        self.choice = self.prompts[self.z].choice = int(k)  # kept with the prompt, for undo
        self.masks[self.z] = self.candidates[0][k]

    def _encode(self) -> None:
        if self.predictor is None:
            self.predictor = self.engine.predictor()
        self.fresh_encode = self._encoded != self.z
        if not self.fresh_encode:
            return
        t0 = time.perf_counter()
        if self.opened.kind == "image":
            self.predictor.set_image(self.opened.volume.array[0], self.modality, self.window)
        else:  # the whole volume's mapping, as propagation sees the slice
            t, n = self.predictor.clip_len, self.shape[0]
            clip = None
            if t > 1:
                clip = np.stack([self._slice01(min(max(self.z + k - t // 2, 0), n - 1))
                                 for k in range(t)])  # fmt: skip
            self.predictor.set_image(self._slice01(self.z), "2d", neighbors=clip)
        self._encoded = self.z
        self.last_encode_ms = (time.perf_counter() - t0) * 1000

    def _predict_slice(self) -> None:
        sp = self.prompts.get(self.z)
        self.candidates = None
        if sp is None or sp.empty():
            self.masks[self.z] = False
            return
        self._encode()
        t0 = time.perf_counter()
        multi = len(sp.points) == 1 and sp.box is None
        masks, scores, _ = self.predictor.predict(
            point_coords=sp.points or None, point_labels=sp.labels or None, box=sp.box,
            multimask_output=multi)  # fmt: skip
        chosen = sp.choice if multi and sp.choice is not None else int(np.argmax(scores))
        self.candidates, self.choice = (masks, scores), chosen
        self.masks[self.z] = masks[self.choice]
        self.last_ms = (time.perf_counter() - t0) * 1000

    # -- volumes -------------------------------------------------------------------------------
    def propagate(self, progress: bool = True) -> None:
        """Segment the whole volume from every prompted slice (`propagate_volume`)."""
        if self._need().kind != "volume":
            raise ValueError("propagation is for volumes: this is a 2D image")
        prompts = {z: sp.fields() for z, sp in self.prompts.items() if not sp.empty()}
        if not prompts:
            raise ValueError("prompt the object on at least one slice (a box or clicks), then "
                             "propagate")  # fmt: skip
        self.masks = self.engine.propagate(self.opened.volume.array, prompts, self.modality,
                                           self.window, progress=progress)  # fmt: skip
        self.propagated, self.candidates = True, None

    def summary(self) -> str:
        """Where the object is: slices and volume (ml, when the spacing is known), or area."""
        opened = self._need()
        vol, known = opened.volume, opened.volume.meta.get("spacing_known", True)
        sz, sy, sx = vol.spacing
        if opened.kind == "image":
            px = int(self.masks[0].sum())
            area = f" ({px * sy * sx:.1f} mm²)" if known else ""
            return f"mask: {px} px{area}"
        zs = np.flatnonzero(self.masks.any(axis=(1, 2)))
        if not len(zs):
            return "no slice holds the object yet"
        voxels = int(self.masks.sum())
        ml = (f", {voxels * sz * sy * sx / 1000:.2f} ml" if opened.geometry and known
              else " (no geometry: no volume in ml)")  # fmt: skip
        return f"object on {len(zs)} of {self.shape[0]} slices ({_ranges(zs)}): {voxels} voxels{ml}"

    # -- few-shot ------------------------------------------------------------------------------
    def set_support(self, image: np.ndarray, mask: np.ndarray) -> None:
        """An annotated example (image (H, W[, 3]), mask (H, W) non-zero = object) for a model
        that reads supports; then `segment_few_shot` needs no prompt."""
        if not self.engine.few_shot:
            raise ValueError("this model has no few-shot source (train one with sources: "
                             "hard_prototypes, docs/sources.md)")  # fmt: skip
        if self._few_shot is None:
            self._few_shot = self.engine.predictor(few_shot=True)
        self._few_shot.set_support([image], [np.asarray(mask) > 0], modality=self.modality
                                   if self.opened is not None else "auto")  # fmt: skip

    def segment_few_shot(self) -> None:
        """The current slice segmented from the support alone (no prompt)."""
        self._need()
        if self._few_shot is None or self._few_shot._support is None:
            raise ValueError("set a support image and its mask first")
        image = (self.opened.volume.array[0] if self.opened.kind == "image"
                 else self._slice01(self.z))  # fmt: skip
        self._few_shot.set_image(image, self.modality if self.opened.kind == "image" else "2d",
                                 self.window if self.opened.kind == "image" else None)  # fmt: skip
        masks, _, _ = self._few_shot.predict(multimask_output=False)
        self.masks[self.z], self.candidates = masks[0], None

    # -- output --------------------------------------------------------------------------------
    def picture(self) -> np.ndarray:
        """The current slice with its mask and prompts, (f*H, f*W, 3) uint8 (app.render)."""
        from samed2_kit.app.render import overlay

        self._need()
        sp = self.prompt
        return overlay(self._slice01(self.z), self.masks[self.z], sp.points, sp.labels, sp.box,
                       sp.corner)  # fmt: skip

    def prompts_json(self) -> dict:
        """The prompts as a `samed2 predict` prompts file."""
        if self._need().kind == "image":
            return self.prompt.fields() if 0 in self.prompts else {}
        return {"slices": {str(z): sp.fields() for z, sp in sorted(self.prompts.items())
                           if not sp.empty()}}  # fmt: skip

    def write(self, fmt: str, folder: Path) -> Path:
        """The mask (or the prompts) as a file in `folder`: "png" (a 2D image, or the current
        slice of a volume), "nifti" (a volume with geometry), "dicom-seg" (a DICOM input), or
        "prompts" (JSON) — the writers of `samed2 predict`."""
        from samed2_kit import export
        from samed2_kit.predict import _write_png
        from samed2_kit.utils.atomic import write_text

        opened = self._need()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = opened.name
        if fmt == "prompts":
            return write_text(folder / f"{name}_prompts.json",
                              json.dumps(self.prompts_json(), indent=1))  # fmt: skip
        if fmt == "png":
            if opened.kind == "image":
                return _write_png(self.masks[0], folder / f"{name}_mask.png")
            return _write_png(self.masks[self.z], folder / f"{name}_slice{self.z}_mask.png")
        if fmt == "nifti":
            if not (opened.geometry and opened.volume.meta.get("spacing_known", True)):
                raise ValueError(f"{name} has no geometry (a 2D image or a volume without "
                                 "spacing): download PNG instead")  # fmt: skip
            return export.write_nifti(self.masks, opened.volume, folder / f"{name}_mask.nii.gz")
        if fmt == "dicom-seg":
            if opened.fmt != "dicom":
                raise ValueError("DICOM-SEG references the source DICOM series: this input is "
                                 f"{opened.fmt}; download NIfTI or PNG")  # fmt: skip
            uid = opened.volume.meta.get("series_uid")
            return export.write_dicom_seg(self.masks, opened.source, folder / f"{name}_seg.dcm",
                                          labels=SEG_LABELS, series_uid=uid)  # fmt: skip
        raise ValueError(f"format {fmt!r}: one of png, nifti, dicom-seg, prompts")

    def save_example(self, folder, spec) -> Path:
        """The opened image and its mask into `folder` as a medbank source (app.examples)."""
        from samed2_kit.app.examples import save_example

        self._need()
        return save_example(folder, self.opened, self.masks, spec)
