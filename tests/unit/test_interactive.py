"""ClickSegmenter: synthetic matplotlib events on the Agg backend drive points, mask, undo, clear."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import KeyEvent, MouseButton, MouseEvent  # noqa: E402

from samed2_kit.interactive import ClickSegmenter  # noqa: E402
from samed2_kit.model.predictor import Predictor  # noqa: E402

H, W = 120, 160


class Spy(Predictor):
    """A real predictor that records what each predict() was given."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def predict(self, **kw):
        self.calls.append(kw)
        return super().predict(**kw)


@pytest.fixture
def seg(tiny_model):
    yy, xx = np.mgrid[:H, :W]
    image = (((yy - 60) ** 2 + (xx - 80) ** 2 < 30**2) * 200 + 20).astype(np.uint8)
    fig, ax = plt.subplots()
    s = ClickSegmenter(Spy(tiny_model), image, ax=ax)
    yield s
    plt.close(fig)


def click(seg, x, y, button=MouseButton.LEFT, key=None, ax=None):
    """A button press at data (x, y) of `ax` (default: the segmenter's axes)."""
    ax = ax or seg.ax
    px, py = ax.transData.transform((x, y))
    ev = MouseEvent("button_press_event", seg.ax.figure.canvas, px, py, button=button, key=key)
    seg.on_click(ev)
    return ev


def key(seg, k):
    seg.on_key(KeyEvent("key_press_event", seg.ax.figure.canvas, k))


def test_clicks_add_points_and_predict_with_previous_logits(seg):
    ev = click(seg, 80, 60)
    assert ev.inaxes is seg.ax and ev.xdata == pytest.approx(80, abs=0.5)
    np.testing.assert_allclose(seg.points, [[ev.xdata, ev.ydata]])
    assert seg.labels.tolist() == [1]
    assert seg.mask.shape == (H, W) and seg.mask.dtype == bool
    assert seg.logits.shape == (1, 64, 64) and np.isfinite(seg.score)
    assert seg.predictor.calls[0]["mask_input"] is None
    first_logits = seg.logits

    click(seg, 10, 10, button=MouseButton.RIGHT)  # right click: negative
    click(seg, 150, 110, key="shift")  # shift + left click: negative
    assert seg.labels.tolist() == [1, 0, 0] and seg.points.shape == (3, 2)
    second = seg.predictor.calls[1]
    assert second["mask_input"] is first_logits  # the previous low-res logits go back in
    assert second["point_labels"].tolist() == [1, 0]
    assert len(seg.predictor.calls) == 3
    # the overlay and the point markers follow
    assert seg._pos.get_offsets().shape == (1, 2) and seg._neg.get_offsets().shape == (2, 2)
    assert seg._overlay.get_array()[..., 3].max() > 0 or not seg.mask.any()


def test_clicks_outside_the_axes_or_image_are_ignored(seg):
    fig = seg.ax.figure
    other = fig.add_axes([0.0, 0.0, 0.1, 0.1])
    other.set_xlim(0, 1)
    ev = MouseEvent("button_press_event", fig.canvas, 1, 1, button=MouseButton.LEFT)
    assert ev.inaxes is not seg.ax
    seg.on_click(ev)
    ev.inaxes, ev.xdata, ev.ydata = seg.ax, None, None  # on the axes frame, no data position
    seg.on_click(ev)
    ev.xdata, ev.ydata = W + 50.0, 10.0  # beyond the image
    seg.on_click(ev)
    click(seg, 50, 50, button=MouseButton.MIDDLE)
    px, py = seg.ax.transData.transform((50, 50))
    seg.on_click(MouseEvent("button_press_event", fig.canvas, px, py, button=1, dblclick=True))
    assert len(seg.points) == 0 and seg.mask is None and seg.predictor.calls == []


def test_undo_restores_the_previous_state_and_clear_resets(seg):
    click(seg, 80, 60)
    points1, mask1, logits1 = seg.points.copy(), seg.mask.copy(), seg.logits
    click(seg, 20, 20, button=MouseButton.RIGHT)
    key(seg, "z")
    np.testing.assert_array_equal(seg.points, points1)
    np.testing.assert_array_equal(seg.mask, mask1)
    assert seg.logits is logits1 and seg.labels.tolist() == [1]
    key(seg, "z")
    assert len(seg.points) == 0 and seg.mask is None and seg.logits is None
    key(seg, "z")  # nothing left to undo: no error
    click(seg, 80, 60)
    click(seg, 30, 30)
    key(seg, "c")
    assert len(seg.points) == 0 and len(seg.labels) == 0 and seg.mask is None
    assert seg._overlay.get_array()[..., 3].max() == 0
    key(seg, "q")  # other keys do nothing
    assert len(seg.points) == 0


def test_multimask_first_click_keeps_the_best_candidate_and_box_goes_along(tiny_model):
    image = np.random.default_rng(0).integers(0, 255, (H, W), dtype=np.uint8)
    fig, ax = plt.subplots()
    spy = Spy(tiny_model)
    seg = ClickSegmenter(spy, image, ax=ax, multimask=True, box=[20, 20, 140, 100])
    seg.add_point(80, 60)
    assert spy.calls[0]["multimask_output"] is True
    masks, scores, _ = spy.predict(point_coords=[[80, 60]], point_labels=[1],
                                   box=[20, 20, 140, 100], multimask_output=True)  # fmt: skip
    np.testing.assert_array_equal(seg.mask, masks[int(np.argmax(scores))])
    assert seg.score == pytest.approx(float(scores.max()))
    seg.add_point(30, 30, positive=False)
    assert spy.calls[-1]["multimask_output"] is False  # (calls[1] is the reference above)
    np.testing.assert_array_equal(spy.calls[-1]["box"], [20, 20, 140, 100])
    assert seg.mask.shape == (H, W)
    plt.close(fig)


def test_disconnect_stops_events(seg):
    canvas = seg.ax.figure.canvas
    seg.disconnect()
    px, py = seg.ax.transData.transform((80, 60))
    canvas.callbacks.process(
        "button_press_event",
        MouseEvent("button_press_event", canvas, px, py, button=MouseButton.LEFT),
    )
    assert len(seg.points) == 0


def test_events_reach_the_handler_through_the_canvas(seg):
    canvas = seg.ax.figure.canvas
    px, py = seg.ax.transData.transform((80, 60))
    canvas.callbacks.process(
        "button_press_event",
        MouseEvent("button_press_event", canvas, px, py, button=MouseButton.LEFT),
    )
    canvas.callbacks.process("key_press_event", KeyEvent("key_press_event", canvas, "z"))
    assert len(seg.predictor.calls) == 1 and len(seg.points) == 0
