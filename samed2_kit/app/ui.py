"""The page (Gradio Blocks): open an image or a volume, click, propagate, download, save.

Every handler works on the tab's own `Session` (keyed by Gradio's session hash: two tabs never
see each other's images) and ends in `_view`, which returns the same outputs: the picture, the
status line, the slice slider, the candidates and the summary. An error in a handler (a corrupt
upload, a click outside the image, a missing prompt) becomes a line in the status, prefixed
"Error:", and the server keeps serving. Element ids (`#picture`, `#upload`, ...) are part of the
interface: the browser tests and users' own scripts address them.
"""

import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

from samed2_kit.app.session import MODES, Session

MAX_SESSIONS = 32  # tabs kept at once (the oldest is forgotten first)
INTENSITY = ("auto", "ct", "mr", "2d")
MODALITIES = ("ct", "mr", "pet", "us", "xray", "endoscopy", "dermoscopy", "fundus", "pathology",
              "other")  # fmt: skip


class Sessions:
    """{session hash: Session}, at most MAX_SESSIONS, each with its own temporary folder."""

    def __init__(self, engine, root: Path):
        self.engine, self.root = engine, Path(root)
        self._all: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request) -> Session:
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            if key not in self._all:
                while len(self._all) >= MAX_SESSIONS:
                    self._drop(next(iter(self._all)))
                work = Path(tempfile.mkdtemp(prefix="tab-", dir=self.root))
                self._all[key] = Session(self.engine, work)
            self._all.move_to_end(key)
            return self._all[key]

    def _drop(self, key: str) -> None:
        s = self._all.pop(key, None)
        if s is not None:
            shutil.rmtree(s.workdir, ignore_errors=True)

    def drop(self, request) -> None:
        with self._lock:
            self._drop(getattr(request, "session_hash", None) or "default")


def build(engine, data_dir=None, examples_dir=None, image=None):
    """The Blocks app for `engine` (app.engine.Engine). data_dir: a folder whose files the page
    may open (nothing else on disk is reachable); examples_dir: where "save as training example"
    writes (default ./samed2-annotations); image: a path opened in every new tab."""
    import gradio as gr

    from samed2_kit.app import files
    from samed2_kit.app.examples import ExampleSpec, read_example_spec

    root = Path(tempfile.mkdtemp(prefix="samed2-app-"))
    tabs = Sessions(engine, root)
    examples_dir = Path(examples_dir or "samed2-annotations").resolve()
    entries = files.data_entries(data_dir) if data_dir else []
    known = read_example_spec(examples_dir) if examples_dir.is_dir() else None

    def view(s: Session, msg: str = ""):
        pending = s.pending is not None
        names = [f"{label} ({uid})" for uid, label in s.series] if pending else []
        series = gr.update(choices=names, value=None, visible=pending)
        if s.opened is None:
            return (None, msg or "Open an image or a volume.", gr.update(visible=False),
                    gr.update(choices=[], value=None), "", series)  # fmt: skip
        n = s.shape[0]
        slider = gr.update(minimum=0, maximum=max(n - 1, 1), value=s.z, visible=n > 1)
        cands = gr.update(choices=[], value=None)
        if s.candidates is not None and len(s.candidates[1]) > 1:
            names = [f"{k}: IoU {v:.3f}" for k, v in enumerate(s.candidates[1])]
            cands = gr.update(choices=names, value=names[s.choice])
        return s.picture(), msg, slider, cands, s.summary(), series

    def act(fn):
        """Run fn(session, *args) -> message; any error becomes the status line."""

        # Gradio passes the request and the progress tracker by their positions here
        def run(request: gr.Request, progress=gr.Progress(track_tqdm=True), *args):  # noqa: B008
            s = tabs.get(request)
            try:
                msg = fn(s, *args) or ""
            except Exception as e:  # shown in the page; the server keeps serving
                msg = f"Error: {e}"
            try:
                return view(s, msg)
            except Exception as e:  # a state the picture cannot show: start the tab afresh
                s.opened = None
                return view(s, f"Error: {e} (open the image again)")

        return run

    def opened_msg(s: Session) -> str:
        o = s.opened
        z, h, w = s.shape
        what = f"{w} x {h} image" if o.kind == "image" else f"volume of {z} slices, {w} x {h}"
        return " ".join([f"Opened {o.name}: {what}, intensity {s.modality}.", *o.notes])

    def open_path(s: Session, path, intensity="auto", series_uid=None) -> str:
        s.pending = None
        try:
            opened = files.open_input(path, series_uid=series_uid, workdir=s.workdir)
        except files.SeriesChoice as e:
            s.pending, s.series = Path(path), e.series
            return f"{Path(path).name} holds {len(e.series)} DICOM series: pick one below."
        s.open(opened, modality=intensity)
        return opened_msg(s)

    def on_upload(s: Session, f, intensity):
        if f is None:
            return ""
        return open_path(s, getattr(f, "name", f), intensity)

    def on_data(s: Session, entry, intensity):
        if not entry:
            return ""
        return open_path(s, files.resolve_data(data_dir, entry), intensity)

    def on_series(s: Session, choice, intensity):
        if not choice or s.pending is None:
            return ""
        uid = next((u for u, label in s.series if f"{label} ({u})" == choice), choice)  # view's
        return open_path(s, s.pending, intensity, series_uid=uid)

    def on_click(s: Session, mode, auto, index):
        from samed2_kit.app.render import scale_of, to_image

        z, h, w = s.shape
        x, y = to_image(float(index[0]), float(index[1]), scale_of(h, w))
        t0 = time.perf_counter()
        s.click(x, y, mode)
        msg = f"{mode} at ({x:.0f}, {y:.0f})"
        if s.prompt.corner is not None:
            return msg + ": now click the opposite corner of the box"
        if auto and s.propagated:
            s.propagate()
            msg += ", propagated again"
        ms = (time.perf_counter() - t0) * 1000
        enc = f", encoder {s.last_encode_ms:.0f} ms" if s.fresh_encode else ""
        return f"{msg}: mask in {s.last_ms or 0:.0f} ms (server {ms:.0f} ms{enc})"

    with gr.Blocks(title="samed2-kit", analytics_enabled=False) as demo:
        gr.Markdown(f"### samed2-kit: {engine.describe()}")
        with gr.Row():
            with gr.Column(scale=3):
                picture = gr.Image(type="numpy", format="jpeg", interactive=False,
                                   buttons=["fullscreen"], show_label=False,
                                   elem_id="picture")  # fmt: skip
                slider = gr.Slider(0, 1, step=1, label="slice", visible=False, elem_id="slice")
                status = gr.Markdown("Open an image or a volume.", elem_id="status")
                summary = gr.Markdown("", elem_id="summary")
            with gr.Column(scale=2):
                upload = gr.File(label="Open: PNG, JPEG, TIFF, NIfTI, NRRD, DICOM (.dcm or .zip)",
                                 elem_id="upload")  # fmt: skip
                data = gr.Dropdown(entries, value=None, label=f"or from {data_dir}",
                                   visible=bool(entries), elem_id="data")  # fmt: skip
                series = gr.Radio(
                    [], label="DICOM series (pick one)", elem_id="series", visible=False
                )  # choices come with the upload
                intensity = gr.Dropdown(list(INTENSITY), value="auto", label="intensity",
                                        elem_id="intensity")  # fmt: skip
                mode = gr.Radio(list(MODES), value="positive", label="a click adds",
                                elem_id="mode")  # fmt: skip
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="undo")
                    clear = gr.Button("Clear", elem_id="clear")
                cands = gr.Radio([], type="index", label="candidates", elem_id="candidates")
                with gr.Accordion("Volume", open=True):
                    propagate = gr.Button("Propagate through the volume", elem_id="propagate")
                    auto = gr.Checkbox(True, label="re-propagate after each click once "
                                       "propagated", elem_id="auto")  # fmt: skip
                with gr.Accordion("Few-shot (support example)", open=False):
                    sup_img = gr.File(label="support image", elem_id="support-image")
                    sup_mask = gr.File(label="its mask", elem_id="support-mask")
                    sup_set = gr.Button("Use as support", elem_id="support-set")
                    sup_run = gr.Button("Segment without a prompt", elem_id="support-run")
                with gr.Accordion("Download", open=True):
                    with gr.Row():
                        dl = {f: gr.Button(label, elem_id=f"dl-{f}", size="sm") for f, label in
                              (("png", "PNG"), ("nifti", "NIfTI"), ("dicom-seg", "DICOM-SEG"),
                               ("prompts", "prompts"))}  # fmt: skip
                    out_file = gr.File(label="download", elem_id="download", interactive=False)
                with gr.Accordion("Save as training example", open=True):
                    gr.Markdown(f"into `{examples_dir}` (a medbank source and its spec.yaml)")
                    ex_mod = gr.Radio(list(MODALITIES), value=known.modality if known else None,
                                      label="modality", elem_id="ex-modality")  # fmt: skip
                    ex_task = gr.Textbox(known.task if known else "", label="task",
                                         elem_id="ex-task")  # fmt: skip
                    ex_lic = gr.Textbox(known.licence if known else "", label="licence",
                                        elem_id="ex-licence")  # fmt: skip
                    ex_save = gr.Button("Save", elem_id="ex-save")

        outs = [picture, status, slider, cands, summary, series]
        # the drop area is emptied after each upload, ready for the next file
        upload.upload(act(on_upload), [upload, intensity], outs).then(lambda: None, None, upload)
        data.input(act(on_data), [data, intensity], outs)
        series.input(act(on_series), [series, intensity], outs)
        intensity.input(act(lambda s, v: s.opened and open_again(s, v)), [intensity], outs)
        clicked = act(on_click)

        def click(mode, auto, evt: gr.SelectData, request: gr.Request):
            return clicked(request, None, mode, auto, evt.index)

        picture.select(click, [mode, auto], outs)
        undo.click(act(lambda s: s.undo() or "undone"), None, outs)
        clear.click(act(lambda s: s.clear() or "cleared"), None, outs)
        cands.input(act(lambda s, k: s.choose(k) or f"candidate {k}"), [cands], outs)
        slider.input(act(lambda s, z: s.goto(z) or f"slice {s.z}"), [slider], outs)
        propagate.click(act(on_propagate), None, outs)
        sup_set.click(act(on_support), [sup_img, sup_mask], outs)
        sup_run.click(act(on_few_shot), None, outs)
        for fmt, button in dl.items():
            button.click(download(tabs, fmt), None, [out_file, status])

        def save(s: Session, modality, task, licence):
            return on_save(s, examples_dir, ExampleSpec(modality or "", task, licence))

        ex_save.click(act(save), [ex_mod, ex_task, ex_lic], outs)
        if image is not None:
            demo.load(act(lambda s: open_path(s, image) if s.opened is None else ""), None, outs)

        def unload(request: gr.Request):
            tabs.drop(request)

        demo.unload(unload)
    weakref.finalize(demo, shutil.rmtree, root, True)  # the tabs' folders go with the app
    return demo


def open_again(s: Session, intensity: str) -> str:
    s.open(s.opened, modality=intensity)
    return f"intensity {s.modality} (prompts cleared)"


def on_propagate(s: Session) -> str:
    t0 = time.perf_counter()
    s.propagate()
    return f"propagated in {time.perf_counter() - t0:.1f} s"


def on_support(s: Session, image_file, mask_file) -> str:
    from samed2_kit.medbank.io.image import read_image, read_mask

    if image_file is None or mask_file is None:
        raise ValueError("give a support image and its mask (non-zero = the object)")
    s.set_support(read_image(image_file), read_mask(mask_file))
    return "support set: press 'Segment without a prompt'"


def on_few_shot(s: Session) -> str:
    s.segment_few_shot()
    return "segmented from the support (no prompt)"


def on_save(s: Session, folder: Path, spec) -> str:
    path = s.save_example(folder, spec)
    return (
        f"saved {path.name} in {folder}: `samed2 medbank build {folder / 'spec.yaml'} --out STORE`"
    )


def download(tabs: Sessions, fmt: str):
    import gradio as gr

    def run(request: gr.Request):
        s = tabs.get(request)
        try:
            folder = Path(tempfile.mkdtemp(prefix="dl-", dir=s.workdir))
            path = s.write(fmt, folder)
            return str(path), f"ready: {path.name}"
        except Exception as e:
            return None, f"Error: {e}"

    return run
