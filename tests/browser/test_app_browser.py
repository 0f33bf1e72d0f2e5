"""`samed2 app` driven in Chromium as a user would: upload, click, draw a box, propagate,
download, save a training example; each result compared with the Python API on the same prompts
(`Predictor`, `propagate_volume`), a screenshot per step in the test's tmp folder."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SAMPLES = Path(__file__).resolve().parents[2] / "samed2_kit" / "sample_data"
IMAGE = SAMPLES / "hc18" / "images" / "000_HC.png"
VOLUME = SAMPLES / "msd_hippocampus" / "images" / "hippocampus_001.nii.gz"
TIMEOUT_MS = 60_000
STATUS = "#status [data-testid=markdown]"  # the status line's text (not its progress timer)
# the app is idle (no progress shown on the status) and the status holds text t or an error
WAIT_JS = """([t, b]) => {
  const busy = document.querySelector('#status [data-testid=status-tracker]:not(.hide)');
  const s = document.querySelector('#status [data-testid=markdown]').innerText;
  return !busy && s !== b && (s.includes(t) || s.includes('Error:'));
}"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a free 127.0.0.1 port serving test-tiny (seed 0) through onnxruntime, as
    `samed2 app` does (backend auto), with the bundled samples as --data."""
    pytest.importorskip("gradio")
    from samed2_kit.app import serve
    from samed2_kit.app.engine import Engine
    from samed2_kit.model.build import build_model

    root = tmp_path_factory.mktemp("app")
    engine = Engine.open(build_model("test-tiny", image_size=256).eval())
    demo = serve(engine, data=SAMPLES, examples=root / "annotations", quiet=True)
    yield demo, engine, root
    demo.close()


class Page:
    """A browser tab on the app, with the steps the tests take."""

    def __init__(self, browser, url: str, shots: Path):
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 1100},
                                       accept_downloads=True)  # fmt: skip
        self.pg = self.ctx.new_page()
        self.pg.goto(url)
        self.pg.wait_for_selector("#status", timeout=TIMEOUT_MS)
        self.shots, self.n = shots, 0

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.shots / f"{self.n:02d}_{name}.png"
        self.pg.screenshot(path=str(path), full_page=True)
        return path

    def status(self) -> str:
        return self.pg.inner_text(STATUS)

    def wait(self, text: str, before: str | None = None) -> str:
        """Wait until the status line holds `text` (or an error), and differs from `before`;
        returns the status."""
        self.pg.wait_for_function(WAIT_JS, arg=[text, before], timeout=TIMEOUT_MS)
        status = self.status()
        assert text in status, status
        return status

    def upload(self, path: Path, expect: str = "Opened") -> str:
        before = self.status()
        self.pg.set_input_files("#upload input[type=file]", str(path))
        status = self.wait(expect, before)
        # the drop area empties after an upload (ready for the next file)
        self.pg.wait_for_selector("#upload input[type=file]", state="attached", timeout=TIMEOUT_MS)
        return status

    def mode(self, name: str) -> None:
        self.pg.locator("#mode label", has_text=name).click()

    def click(self, fx: float, fy: float, expect: str = "mask in") -> str:
        """Click the picture at fractions (fx, fy) of its width and height."""
        before = self.status()
        b = self.pg.locator("#picture img").bounding_box()
        self.pg.mouse.click(b["x"] + fx * b["width"], b["y"] + fy * b["height"])
        return self.wait(expect, before)

    def picture(self) -> np.ndarray:
        """The picture as shown (decoded from the page's img)."""
        import io

        from PIL import Image

        data = self.pg.locator("#picture img").screenshot()
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def download(self, fmt: str, out: Path) -> Path:
        before = self.status()
        self.pg.click(f"#dl-{fmt}")
        self.wait("ready:", before)
        link = self.pg.locator("#download a").first
        with self.pg.expect_download(timeout=TIMEOUT_MS) as d:
            link.click()
        path = out / d.value.suggested_filename
        d.value.save_as(str(path))
        return path


@pytest.fixture
def page(browser, app, tmp_path):
    demo, _, _ = app
    p = Page(browser, demo.local_url, tmp_path)
    yield p
    p.ctx.close()


def _latency(status: str) -> float:
    return float(status.split("mask in ")[1].split(" ms")[0])


def test_image_clicks_and_box_give_the_predictors_mask(page, app, tmp_path):
    from PIL import Image

    from samed2_kit.model.predictor import Predictor

    _, engine, _ = app
    page.upload(IMAGE)
    page.shot("opened")
    blank = page.picture()
    s1 = page.click(0.5, 0.5)
    page.shot("positive_click")
    assert (page.picture() != blank).any(), "the overlay did not change after a click"
    page.mode("box")
    page.click(0.25, 0.2, expect="opposite corner")
    page.shot("box_first_corner")
    s2 = page.click(0.75, 0.8)
    page.shot("box_done")
    prompts = json.loads(page.download("prompts", tmp_path).read_text())
    mask = np.asarray(Image.open(page.download("png", tmp_path))) > 0
    page.shot("downloaded")
    assert set(prompts) == {"box", "points", "labels"} and prompts["labels"] == [1]

    pred = Predictor(engine.onnx(), backend="onnx")
    pred.set_image(np.asarray(Image.open(IMAGE)))
    want, _, _ = pred.predict(point_coords=prompts["points"], point_labels=prompts["labels"],
                              box=prompts["box"], multimask_output=False)  # fmt: skip
    assert mask.shape == want[0].shape
    assert (mask == want[0]).mean() > 0.9999  # the same (rounded coordinates aside)
    print(f"per-click latency: {_latency(s1):.0f} ms, {_latency(s2):.0f} ms")


def test_volume_prompt_propagate_download_and_save_example(page, app, tmp_path):
    import nibabel as nib

    from samed2_kit.medbank.io import read_volume

    _, engine, root = app
    page.upload(VOLUME)
    page.pg.wait_for_selector("#slice", state="visible", timeout=TIMEOUT_MS)
    page.shot("volume_opened")
    page.mode("box")
    page.click(0.2, 0.2, expect="opposite corner")
    page.click(0.8, 0.8)
    page.shot("volume_box")
    before = page.status()
    page.pg.click("#propagate")
    page.wait("propagated in", before)
    page.shot("propagated")
    assert "slices" in page.pg.inner_text("#summary")
    page.mode("negative")
    assert "propagated again" in page.click(0.9, 0.9)  # a corrective click re-propagates
    page.shot("corrected_and_propagated_again")
    prompts = json.loads(page.download("prompts", tmp_path).read_text())
    got = np.asarray(nib.load(page.download("nifti", tmp_path)).dataobj)
    volume = read_volume(VOLUME)
    slices = {int(z): p for z, p in prompts["slices"].items()}
    want = engine.propagate(volume.array, slices, "auto", None, progress=False)
    assert np.array_equal(got.transpose(2, 1, 0) > 0, want)

    page.pg.locator("#ex-modality label", has_text="mr").first.click()
    page.pg.fill("#ex-task textarea", "hippocampus")
    page.pg.fill("#ex-licence textarea", "CC-BY-SA-4.0")
    before = page.status()
    page.pg.click("#ex-save")
    page.wait("saved", before)
    page.shot("saved_example")
    from samed2_kit.cli import main

    store = tmp_path / "store"
    assert main(["medbank", "build", str(root / "annotations" / "spec.yaml"), "--out",
                 str(store)]) == 0  # fmt: skip
    assert (store / "manifest.json").is_file()


def test_bad_upload_is_a_message_and_the_server_keeps_serving(page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    assert "notes.png" in page.upload(bad, expect="Error:")
    page.shot("bad_upload")
    page.upload(IMAGE)
    page.click(0.5, 0.5)
    page.shot("after_bad_upload")


def test_two_tabs_do_not_share_images_and_files_outside_are_refused(browser, app, tmp_path):
    demo, _, _ = app
    a, b = Page(browser, demo.local_url, tmp_path), Page(browser, demo.local_url, tmp_path)
    try:
        a.upload(IMAGE)
        b.shot("second_tab")
        assert "Open an image" in b.status()  # a's image is not in b
        assert b.pg.locator("#picture img").count() == 0
    finally:
        a.ctx.close()
        b.ctx.close()
    for path in ("/etc/passwd", str(IMAGE)):
        url = f"{demo.local_url}gradio_api/file={path}"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code in (403, 404)


def test_dicom_zip_with_two_series_asks_which_then_gives_a_dicom_seg(page, tmp_path):
    import zipfile

    import pydicom

    from tests._dicom import write_series

    study = tmp_path / "study"
    for uid in ("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"):
        write_series(study / uid[-1], uid, n=4, size=32)
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(study.rglob("*.dcm")):
            zf.write(f, f.relative_to(study).as_posix())
    assert "pick one" in page.upload(zpath, expect="2 DICOM series")
    page.shot("dicom_two_series")
    before = page.status()
    option = page.pg.locator("#series label").nth(1)
    uid = option.inner_text().strip().rsplit("(", 1)[1].rstrip(")")
    option.click()
    page.wait("Opened", before)
    page.shot("dicom_series_chosen")
    page.mode("box")
    page.click(0.2, 0.2, expect="opposite corner")
    page.click(0.8, 0.8)
    seg = pydicom.dcmread(page.download("dicom-seg", tmp_path))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid


def test_data_entries_open_from_the_list(page):
    before = page.status()
    page.pg.locator("#data input").click()
    page.pg.locator("[role=option]", has_text="hc18/images/000_HC.png").first.click()
    assert "000_HC" in page.wait("Opened", before)
    page.shot("opened_from_data")
    page.click(0.5, 0.5)


@pytest.fixture(scope="module")
def few_shot_app(tmp_path_factory):
    """The app serving test-tiny with a hard_prototypes source (few-shot; torch)."""
    from samed2_kit.app import serve
    from samed2_kit.app.engine import Engine
    from samed2_kit.model.assemble import add_sources
    from samed2_kit.model.build import build_model
    from samed2_kit.sources import HardPrototypesConfig

    model = build_model("test-tiny", image_size=256).eval()
    add_sources(model, {"hard_prototypes": HardPrototypesConfig()})
    engine = Engine.open(model, backend="torch")
    demo = serve(engine, examples=tmp_path_factory.mktemp("fs") / "annotations", quiet=True)
    yield demo, model
    demo.close()


def test_few_shot_support_then_segment_without_a_prompt(browser, few_shot_app, tmp_path):
    from PIL import Image

    from samed2_kit.medbank.io import read_volume
    from samed2_kit.model.predictor import Predictor

    demo, model = few_shot_app
    support = SAMPLES / "hc18" / "images" / "010_HC.png"
    support_mask = SAMPLES / "hc18" / "masks" / "010_HC_Annotation.png"
    page = Page(browser, demo.local_url, tmp_path)
    try:
        page.upload(IMAGE)
        page.pg.get_by_text("Few-shot (support example)").click()  # open the section
        page.pg.set_input_files("#support-image input[type=file]", str(support))
        page.pg.set_input_files("#support-mask input[type=file]", str(support_mask))
        page.pg.wait_for_selector("#support-mask a", timeout=TIMEOUT_MS)  # both uploaded
        before = page.status()
        page.pg.click("#support-set")
        page.wait("support set", before)
        before = page.status()
        page.pg.click("#support-run")
        page.wait("segmented from the support", before)
        page.shot("few_shot")
        got = np.asarray(Image.open(page.download("png", tmp_path))) > 0
    finally:
        page.ctx.close()
    pred = Predictor(model)
    pred.set_support([read_volume(support).array[0]],
                     [read_volume(support_mask, labels=True).array[0] > 0])  # fmt: skip
    pred.set_image(read_volume(IMAGE).array[0])
    want, _, _ = pred.predict(multimask_output=False)
    assert np.array_equal(got, want[0])
