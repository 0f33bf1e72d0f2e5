"""The interactive app: `samed2 app RUN` in the browser, `launch(...)` inside a notebook.

    from samed2_kit.app import launch
    app = launch("runs/quickstart", image="scan.nii.gz")   # the page, inline in Jupyter
    app.close()

Gradio (the `app` extra: pip install "samed2-kit[app]") serves the page on 127.0.0.1 only. The
parts: `engine` (the model and its backends), `files` (what may be opened), `session` (one tab's
work, no GUI), `render` (the picture), `examples` (saving training examples), `ui` (the page).
"""

from __future__ import annotations

from pathlib import Path

INSTALL_FIX = 'pip install "samed2-kit[app]" (in a clone: pip install -e ".[app]")'
HOST = "127.0.0.1"


def require_gradio():
    try:
        import gradio
    except ImportError as e:
        raise ImportError(f"the app needs gradio ({e}): {INSTALL_FIX}") from e
    return gradio


def serve(model, *, data=None, examples=None, image=None, port=None, backend="auto",
          inline=None, block=False, max_upload_mb=None, quiet=False):  # fmt: skip
    """Start the app; returns the Gradio Blocks (its `.local_url`; `.close()` stops it).

    model: a run folder, an export folder or a SAMed2Model (app.engine.Engine.open).
    data: a folder whose images/volumes the page lists (nothing else on disk is reachable).
    examples: where "save as training example" writes (default ./samed2-annotations).
    image: a file opened in every new tab. port: None picks a free one from 7860.
    backend: "auto" (onnxruntime when installed), "torch" or "onnx".
    block: wait until Ctrl-C (the CLI); otherwise return at once (notebooks, tests).
    """
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    require_gradio()
    from samed2_kit.app.engine import Engine
    from samed2_kit.app.files import MAX_UPLOAD_MB
    from samed2_kit.app.ui import build

    if data is not None and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data} is not a folder: pass the folder of images "
                                "and volumes the page may open")  # fmt: skip
    engine = model if hasattr(model, "predictor") else Engine.open(model, backend=backend)
    demo = build(engine, data_dir=data, examples_dir=examples, image=image)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=HOST, server_port=port, inline=inline, prevent_thread_lock=not block,
                share=False, quiet=quiet, show_error=True,
                max_file_size=f"{max_upload_mb or MAX_UPLOAD_MB}mb",
                footer_links=[])  # fmt: skip
    return demo


def launch(model, image=None, **kwargs):
    """The app inline in a Jupyter notebook (also works in a script: it prints the URL).
    `model`: a run folder, an export folder or a SAMed2Model; `image`: a file opened at once.
    Other keywords: `serve`'s (data, examples, port, backend). Returns the Blocks; call its
    `.close()` when done."""
    kwargs.setdefault("inline", _in_notebook())
    return serve(model, image=image, **kwargs)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
