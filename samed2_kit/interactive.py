"""Click-to-segment in Jupyter, on matplotlib events (no ipywidgets).

    %matplotlib widget                      # the ipympl backend: clicks reach the kernel
    from samed2_kit.interactive import ClickSegmenter
    seg = ClickSegmenter(Predictor(model), image)
    # left click: positive point; right click or shift+click: negative; "z": undo; "c": clear
    seg.points, seg.labels, seg.mask        # the clicks so far and the current mask

After each click the predictor is re-prompted with every click so far (and the box, if given)
plus its previous low-res logits as `mask_input` (SAM's interactive protocol). Undo restores the
state before the last click; clear forgets everything. The event handlers are plain methods
(`on_click`, `on_key`), and `add_point`/`undo`/`clear` work without any GUI.
"""

from __future__ import annotations

import numpy as np

UNDO_KEYS = ("z", "ctrl+z", "cmd+z")
CLEAR_KEYS = ("c",)


class ClickSegmenter:
    """Show `image` on `ax` (a new figure when None) and segment it from clicks.

    Args:
        predictor: a `samed2_kit.model.predictor.Predictor`.
        image: (H, W) or (H, W, 3) array; encoded with `predictor.set_image` unless
            `encode=False` (the predictor already holds it).
        multimask: for a single click (ambiguous) ask for three candidates and keep the best
            scoring; later clicks ask for one mask.
        box: optional fixed (x0, y0, x1, y1) box sent with every prompt (corners in any order;
            checked against the image here, so a bad box fails now, not inside a click handler).
        modality, window: intensity handling for `set_image` (window also sets the display).
    """

    def __init__(self, predictor, image, ax=None, multimask=False, box=None,
                 modality="auto", window=None, encode=True, color=(0.1, 0.6, 1.0)):  # fmt: skip
        import matplotlib.pyplot as plt

        from samed2_kit.prompts import check_prompt, is_given

        self.predictor, self.image = predictor, np.asarray(image)
        self.multimask, self.box = multimask, None
        if is_given(box):
            hw = self.image.shape[:2]
            self.box = check_prompt({"box": box}, hw, "ClickSegmenter", fields=("box",)).box
        if encode:
            predictor.set_image(self.image, modality=modality, window=window)
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 6 * self.image.shape[0] / self.image.shape[1]))
        self.ax = ax
        self.color = color
        self._history: list[tuple] = []  # (points, labels, mask, logits, score) before each click
        self._reset_state()
        vmin = vmax = None
        if window is not None:
            vmin, vmax = window[0] - window[1] / 2, window[0] + window[1] / 2
        ax.imshow(self.image, cmap="gray", vmin=vmin, vmax=vmax)
        h, w = self.image.shape[:2]
        self._overlay = ax.imshow(np.zeros((h, w, 4)), interpolation="nearest")
        self._pos = ax.scatter([], [], marker="*", s=160, c="lime", edgecolors="white")
        self._neg = ax.scatter([], [], marker="X", s=110, c="red", edgecolors="white")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow"))
        ax.set_axis_off()
        canvas = ax.figure.canvas
        self._cids = [canvas.mpl_connect("button_press_event", self.on_click),
                      canvas.mpl_connect("key_press_event", self.on_key)]  # fmt: skip
        self.redraw()

    def _reset_state(self) -> None:
        self.points = np.zeros((0, 2), dtype=np.float32)
        self.labels = np.zeros((0,), dtype=np.int64)
        self.mask, self.logits, self.score = None, None, None

    # ---- event handlers (GUI -> logic) ----
    def on_click(self, event) -> None:
        """Left click: positive; right click or shift+click: negative; elsewhere: ignored."""
        if event.inaxes is not self.ax or event.xdata is None or event.ydata is None:
            return
        if getattr(event, "dblclick", False):
            return  # the second press of a double click: its first press already counted
        toolbar = getattr(event.canvas, "toolbar", None)
        if toolbar is not None and getattr(toolbar, "mode", ""):
            return  # zooming or panning, not clicking
        h, w = self.image.shape[:2]
        if not (0 <= event.xdata <= w and 0 <= event.ydata <= h):
            return
        button = int(getattr(event.button, "value", event.button) or 0)
        shift = "shift" in (event.key or "")
        if button == 1:
            self.add_point(event.xdata, event.ydata, positive=not shift)
        elif button == 3:
            self.add_point(event.xdata, event.ydata, positive=False)

    def on_key(self, event) -> None:
        if event.key in UNDO_KEYS:
            self.undo()
        elif event.key in CLEAR_KEYS:
            self.clear()

    # ---- logic ----
    def add_point(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        """Add a click at (x, y) image pixels, re-predict, redraw; returns the new mask."""
        self._history.append((self.points, self.labels, self.mask, self.logits, self.score))
        self.points = np.concatenate([self.points, np.array([[x, y]], np.float32)])
        self.labels = np.concatenate([self.labels, np.array([int(positive)], np.int64)])
        self._predict()
        self.redraw()
        return self.mask

    def undo(self) -> None:
        """Forget the last click: back to the points, mask and logits shown before it."""
        if self._history:
            self.points, self.labels, self.mask, self.logits, self.score = self._history.pop()
            self.redraw()

    def clear(self) -> None:
        self._history.clear()
        self._reset_state()
        self.redraw()

    def _predict(self) -> None:
        multi = self.multimask and len(self.points) == 1 and self.logits is None
        masks, scores, low = self.predictor.predict(
            point_coords=self.points, point_labels=self.labels, box=self.box,
            mask_input=self.logits, multimask_output=multi,
        )  # fmt: skip
        best = int(np.argmax(scores))
        self.mask, self.score, self.logits = masks[best], float(scores[best]), low[best : best + 1]

    def redraw(self) -> None:
        h, w = self.image.shape[:2]
        rgba = np.zeros((h, w, 4))
        if self.mask is not None:
            rgba[self.mask] = (*self.color, 0.45)
        self._overlay.set_data(rgba)
        pos, neg = self.points[self.labels == 1], self.points[self.labels == 0]
        self._pos.set_offsets(pos if len(pos) else np.zeros((0, 2)))
        self._neg.set_offsets(neg if len(neg) else np.zeros((0, 2)))
        score = "" if self.score is None else f", predicted IoU {self.score:.2f}"
        n = len(self.points)
        self.ax.set_title(
            f"{n} click{'' if n == 1 else 's'}{score}  (z: undo, c: clear)", fontsize=9
        )
        self.ax.figure.canvas.draw_idle()

    def disconnect(self) -> None:
        """Stop listening to the figure's events (the figure stays)."""
        for cid in self._cids:
            self.ax.figure.canvas.mpl_disconnect(cid)
        self._cids = []
