"""Prompts: the `Prompt` class, its validation (`check_prompt`), and seeded prompt sampling
(boxes, points) from ground-truth masks, for training and evaluation.

`Prompt` is the one user-level prompt: the Predictor's arguments, `samed2 predict`'s prompts file
and `propagate_volume`'s per-slice prompts all go through `check_prompt`. (The model's batched
tensors are `samed2_kit.model.wrapper.Prompts`, in model-input pixels.)

Coordinates are pixel coordinates of the given mask in SAM's (x, y) order: x = column, y = row.
Boxes are ``xyxy`` with SAM's *max-index* convention (as SAM / MedSAM training code does):
``x0, y0`` = min column/row, ``x1, y1`` = max column/row (not +1), so a single pixel at
(col 5, row 7) has box (5, 7, 5, 7). Points are pixel indices: pixel (row r, col c) -> (c, r);
SAM 2's prompt encoder adds the half-pixel shift to the centre itself (as sam2's own predictor
expects). Every random draw comes from the ``np.random.Generator`` passed in.

Rules for a user's prompt (`check_prompt`; the same for `Predictor.predict`, a prompts file of
`samed2 predict` and `propagate_volume`):

- an empty list or array (``[]``, shape (0, 2), ...) is the same as leaving the field out; a
  prompt with nothing left is an error that names the fields to give;
- a box is its two corners in any order: ``[x1, y1, x0, y0]`` is sorted to ``[x0, y0, x1, y1]``
  (each coordinate pair on its own), so a reversed box gives the ordered box's mask;
- coordinates are finite numbers (NaN, infinity and strings are errors naming the field), and
  lie in [0, W] x [0, H] of the image (outside is an error naming the image size);
- points are (N, 2) ``[[x, y], ...]``, or one ``[x, y]``; labels are 1 (foreground) or 0
  (background), one per point; points without labels are all foreground (a click on the
  object); labels without points are an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROMPT_MODES = ("box", "point", "box+point", "none")


@dataclass
class PromptConfig:
    """How to prompt: ``mode`` "box" | "point" | "box+point" | "none" (no prompt: few-shot
    training, where a prompt source suggests the clicks); box jitter as a fraction of the box
    width/height per side; ``n_pos`` / ``n_neg`` positive / negative points."""

    mode: str = "box"
    box_jitter: float = 0.05
    n_pos: int = 1
    n_neg: int = 0

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"PromptConfig.mode={self.mode!r}; valid modes: {PROMPT_MODES}")
        if self.box_jitter < 0:
            raise ValueError(f"PromptConfig.box_jitter={self.box_jitter} must be >= 0")
        if self.n_pos < 0 or self.n_neg < 0:
            raise ValueError(f"PromptConfig n_pos={self.n_pos}, n_neg={self.n_neg} must be >= 0")
        if "point" in self.mode and self.n_pos + self.n_neg == 0:
            raise ValueError(f"PromptConfig.mode={self.mode!r} needs n_pos + n_neg > 0")


@dataclass
class Prompt:
    """A prompt on one image (or one slice of a volume), in pixels of that image, x before y.

    ``box`` (4,) float32 x0, y0, x1, y1; ``points`` (N, 2) float32 x, y; ``labels`` (N,) int64,
    1 = foreground, 0 = background, one per point; ``mask`` (H, W) bool, an existing mask of the
    image (volume propagation takes it as the slice's result; empty = no object);
    ``mask_input`` (H, W) bool, an earlier mask of the image that the points/box refine (the
    decoder's mask input, as SAM 2 refines a tracked frame: logits = mask * 20 - 10). Unused parts
    are None. `check_prompt` validates one against its image's (H, W).
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    mask_input: np.ndarray | None = None


PROMPT_FIELDS = ("box", "points", "labels", "mask", "mask_input")


def _as_prompt(prompt, fields: tuple[str, ...], at: str) -> Prompt:
    """`prompt` as a Prompt: a dict's keys must be in `fields`; other types raise ValueError."""
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(fields))
        if unknown:
            raise ValueError(f"{at}unknown keys {unknown}; use {', '.join(fields)}")
        return Prompt(**prompt)
    if not isinstance(prompt, Prompt):
        raise ValueError(
            f"{at}got a {type(prompt).__name__}: give a Prompt or a dict of {', '.join(fields)}"
        )
    return prompt


def is_given(raw) -> bool:
    """Whether a prompt field holds something: None and empty lists / arrays (size 0) do not."""
    if raw is None:
        return False
    if hasattr(raw, "shape"):  # an array or a tensor: no copy
        return int(np.prod(raw.shape)) > 0
    try:
        return np.asarray(raw, dtype=object).size > 0
    except (TypeError, ValueError):  # something odd: the field's own check names it
        return True


def _coordinates(raw, name: str, what: str) -> np.ndarray:
    """`raw` as a float32 array of finite numbers; `what` says the expected layout in errors."""
    try:
        arr = np.asarray(raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be {what} ({e})") from e
    if arr.dtype.kind not in "iuf":
        kind = {"U": "text", "S": "text", "b": "true/false"}.get(arr.dtype.kind, "non-numeric")
        raise ValueError(
            f"{name} must be {what} in pixels; got {kind} values {np.ravel(arr)[:4].tolist()}: "
            "give plain numbers"
        )
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"{name} {arr.tolist()} holds NaN or infinite values: give finite pixel "
            "coordinates, x before y"
        )
    return arr


def _check_box(raw, many_boxes: bool, name: str) -> np.ndarray:
    """`raw` as a (4,) float32 xyxy box, or (K, 4) with `many_boxes`, corners sorted (a box is
    its two corners in any order); `name` names it in errors."""
    box = _coordinates(raw, name, "numbers [x0, y0, x1, y1]")
    if box.size == 0 or box.size % 4 or box.ndim > 2 or (box.size > 4 and not many_boxes):
        shape = "(4,) or (K, 4)" if many_boxes else "4"
        raise ValueError(f"{name} must be {shape} numbers [x0, y0, x1, y1], got shape {box.shape}")
    rows = box.reshape(-1, 4)
    xs, ys = np.sort(rows[:, 0::2], axis=1), np.sort(rows[:, 1::2], axis=1)
    rows = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    return rows if many_boxes else rows.reshape(4)


def _check_points(raw, name: str) -> np.ndarray:
    """`raw` as (N, 2) float32 x, y points (one [x, y] counts as N = 1); `name` names it."""
    pts = _coordinates(raw, name, "a list of [x, y]")
    if pts.shape == (2,):
        return pts.reshape(1, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(
            f"{name} must be a list of [x, y] (shape (N, 2)), got shape {pts.shape}: "
            "give [[x, y], ...]"
        )
    return pts


def _mask_array(raw, hw: tuple[int, int] | None, name: str) -> np.ndarray:
    """`raw` as an (H, W) array (the image's (H, W) when `hw` is given); `name` names it in errors."""
    mask = np.asarray(raw)
    if mask.ndim != 2 or (hw is not None and mask.shape != tuple(hw)):
        size = f"the image is {tuple(hw)}" if hw is not None else "expected (H, W)"
        raise ValueError(f"{name} is {mask.shape}, {size}: give an (H, W) mask")
    return mask


LABELS_RULE = "labels: 1 = foreground, 0 = background"


def _check_labels(raw, n_points: int, at: str, names: dict[str, str], name: str) -> np.ndarray:
    """`raw` as (N,) int64 labels, one per point, each 1 (fg) or 0 (bg); none given: all 1."""
    if not is_given(raw):
        return np.ones(n_points, np.int64)
    try:
        labels = np.asarray(raw).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a list of 1 or 0, one per point ({e})") from e
    if len(labels) != n_points:
        raise ValueError(
            f"{at}{n_points} {names.get('points', 'points')} but {len(labels)} "
            f"{names.get('labels', 'labels')}: give one label per point ({LABELS_RULE}), or "
            "leave the labels out for all-foreground points"
        )
    if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} {labels.tolist()}: each must be 1 or 0 ({LABELS_RULE})")
    return labels.astype(np.int64)


def _check_inside(pts: np.ndarray | None, box: np.ndarray | None, hw: tuple[int, int], field):
    """Every (x, y) point and box corner lies in [0, W] x [0, H]; `field(name)` names it."""
    h, w = hw
    for name, xy in (("points", pts), ("box", None if box is None else box.reshape(-1, 2))):
        bad = None if xy is None else (xy < 0) | (xy > [w, h])
        if bad is not None and bad.any():
            raise ValueError(
                f"{field(name)} {xy[bad.any(1)].tolist()} lies outside the {w}x{h} (WxH) "
                "image: coordinates are (x, y) in pixels of the image the prompt is on, "
                "x in [0, W], y in [0, H]"
            )


def check_prompt(
    prompt: Prompt | dict,
    hw: tuple[int, int] | None = None,
    where: str = "",
    *,
    fields: tuple[str, ...] = PROMPT_FIELDS,
    names: dict[str, str] | None = None,
    many_boxes: bool = False,
) -> Prompt:
    """A validated copy of `prompt` (a Prompt, or a dict of its fields) on an (H, W) image.

    Returns box (4,) float32 with its corners sorted (with ``many_boxes``: (K, 4), one object
    per box), points (N, 2) float32, labels (N,) int64, mask and mask_input (H, W) bool. An
    empty list / array counts as the field left out; points without labels are all foreground
    (label 1). Checks (the module docstring's rules): a dict's keys are in ``fields``; something
    is given; shapes; finite numbers; one label per point, each 1 or 0, and no labels without
    points; a mask comes alone (it is the result); a mask_input comes with points or a box; with
    ``hw``, every point and box corner lies in [0, W] x [0, H] and the masks are (H, W).

    ``where`` names the prompt in errors (e.g. "prompts[40]"); ``names`` renames fields in them
    (e.g. {"points": "point_coords"} for the Predictor's arguments). Raises ValueError naming the
    field and the fix.
    """
    names = names or {}

    def field(name: str) -> str:
        return f"{where}.{names.get(name, name)}" if where else names.get(name, name)

    at = f"{where}: " if where else ""
    prompt = _as_prompt(prompt, fields, at)
    given = {name: is_given(getattr(prompt, name, None)) for name in PROMPT_FIELDS}
    box = pts = labels = None
    if given["box"]:
        box = _check_box(prompt.box, many_boxes, field("box"))
    if given["points"]:
        pts = _check_points(prompt.points, field("points"))
    if given["labels"] and pts is None:
        raise ValueError(
            f"{field('labels')} given without {names.get('points', 'points')}: give one [x, y] "
            "point per label, or leave the labels out"
        )
    if given["mask_input"] and pts is None and box is None:
        raise ValueError(f"{at}a mask_input is refined by points or a box: give them with it")
    if pts is None and box is None and not given["mask"]:
        keys = [names.get(k, k) for k in ("box", "points", "labels")]
        hint = (
            f"a box and/or points (+ labels): {keys[0]} [x0, y0, x1, y1], {keys[1]} "
            f"[[x, y], ...], {keys[2]} [1 or 0 per point]"
        )
        hint += ", or a mask" if "mask" in fields else ""
        raise ValueError(f"{where or 'the prompt'} is empty: give {hint}")
    if given["mask"]:
        mask = _mask_array(prompt.mask, hw, field("mask"))
        if pts is not None or box is not None:
            raise ValueError(f"{at}a mask is the image's result; give it without points/box")
        return Prompt(mask=mask if mask.dtype == bool else mask > 0)
    if pts is not None:
        labels = _check_labels(prompt.labels, len(pts), at, names, field("labels"))
    if hw is not None:
        _check_inside(pts, box, hw, field)
    refine = None
    if given["mask_input"]:
        refine = _mask_array(prompt.mask_input, hw, field("mask_input"))
        refine = refine if refine.dtype == bool else refine > 0
    return Prompt(box=box, points=pts, labels=labels, mask_input=refine)


def _check_mask(mask: np.ndarray) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask has shape {m.shape}; expected an (H, W) boolean mask")
    return m.astype(bool, copy=False)


def box_from_mask(
    mask: np.ndarray, jitter: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Tight ``(4,)`` float32 xyxy box of an ``(H, W)`` mask (max-index convention), optionally jittered.

    Each side moves by ``uniform(-jitter, jitter) * size``, size = box width (x sides) or height
    (y sides) in pixels (max - min + 1); the result is clipped to [0, W-1] x [0, H-1] and kept
    ordered (x0 <= x1, y0 <= y1). ``rng`` is required when ``jitter > 0``.
    """
    m = _check_mask(mask)
    rows, cols = np.nonzero(m)
    if rows.size == 0:
        raise ValueError(
            "mask is empty: no box can be made; drop empty masks (PairDataset(drop_empty=True)) "
            "or give such samples a full-image box"
        )
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)
    if jitter > 0:
        if rng is None:
            raise ValueError("box_from_mask(jitter > 0) needs rng=np.random.default_rng(seed)")
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        box += rng.uniform(-jitter, jitter, size=4) * np.array([w, h, w, h])
        height, width = m.shape
        box[[0, 2]] = np.sort(np.clip(box[[0, 2]], 0, width - 1))
        box[[1, 3]] = np.sort(np.clip(box[[1, 3]], 0, height - 1))
    return box.astype(np.float32)


def _pick(rows: np.ndarray, cols: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    idx = rng.choice(rows.size, size=n, replace=n > rows.size)
    return np.stack([cols[idx], rows[idx]], axis=1).astype(np.float32)


def sample_points(
    mask: np.ndarray,
    n_pos: int = 1,
    n_neg: int = 0,
    rng: np.random.Generator | None = None,
    margin: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample point prompts (pixel indices, x = column) of an ``(H, W)`` mask.

    Positives: uniform over foreground pixels. Negatives: uniform over background pixels inside
    the mask's box enlarged by ``margin`` of its size per side (at least 2 px), so they sit near the
    object; if that region has no background, anywhere in the image. Points are drawn without
    replacement unless there are fewer pixels than points.

    Returns:
        ``coords`` (n_pos + n_neg, 2) float32 xy, positives first; ``labels`` (N,) int64 1/0.
    """
    if rng is None:
        raise ValueError("sample_points needs rng=np.random.default_rng(seed) (deterministic)")
    m = _check_mask(mask)
    parts = []
    if n_pos > 0:
        rows, cols = np.nonzero(m)
        if rows.size == 0:
            raise ValueError("mask is empty: no positive point can be sampled; drop empty masks")
        parts.append(_pick(rows, cols, n_pos, rng))
    if n_neg > 0:
        bg = ~m
        if not bg.any():
            raise ValueError("mask covers the whole image: no negative point; set n_neg=0")
        if m.any():
            x0, y0, x1, y1 = box_from_mask(m)
            dx, dy = max(2.0, margin * (x1 - x0 + 1)), max(2.0, margin * (y1 - y0 + 1))
            near = np.zeros_like(bg)
            near[
                max(0, int(y0 - dy)) : int(y1 + dy) + 1, max(0, int(x0 - dx)) : int(x1 + dx) + 1
            ] = True
            if (bg & near).any():
                bg = bg & near
        rows, cols = np.nonzero(bg)
        parts.append(_pick(rows, cols, n_neg, rng))
    coords = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 2), np.float32)
    labels = np.array([1] * n_pos + [0] * n_neg, dtype=np.int64)
    return coords, labels


def sample_prompt(mask: np.ndarray, cfg: PromptConfig, rng: np.random.Generator) -> Prompt:
    """Sample a :class:`Prompt` for an ``(H, W)`` mask according to ``cfg`` (box first, then points)."""
    prompt = Prompt()
    if "box" in cfg.mode:
        prompt.box = box_from_mask(mask, jitter=cfg.box_jitter, rng=rng)
    if "point" in cfg.mode:
        prompt.points, prompt.labels = sample_points(mask, cfg.n_pos, cfg.n_neg, rng)
    return prompt


def scale_prompt(prompt: Prompt, orig_hw: tuple[int, int], size: int) -> Prompt:
    """Map a prompt from an ``(H, W)`` image to a ``size x size`` model input: x * size / W, y * size / H."""
    if prompt.mask is not None:
        raise ValueError("scale_prompt maps box/points; resize a mask prompt with resize_mask")
    h, w = orig_hw
    factor = np.array([size / w, size / h], dtype=np.float64)
    box = None
    if prompt.box is not None:
        box = (np.asarray(prompt.box, np.float64).reshape(2, 2) * factor).reshape(4)
        box = box.astype(np.float32)
    points = None
    if prompt.points is not None:
        points = (np.asarray(prompt.points, np.float64) * factor).astype(np.float32)
    labels = None if prompt.labels is None else np.asarray(prompt.labels, np.int64).copy()
    return Prompt(box=box, points=points, labels=labels)
