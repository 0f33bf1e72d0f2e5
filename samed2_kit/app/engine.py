"""The model the app serves, shared (read-only) by every browser tab.

`Engine.open(path_or_model)` takes a run folder (`samed2 train` / `quickstart`), an export folder
(`samed2 export`) or a `SAMed2Model` in memory, and picks the backends:

- clicks (`predictor()`): onnxruntime when it is installed (the faster backend at the same masks:
  docs/deploy.md), through an export made once at start-up into a temporary folder for a run
  folder or a model; torch otherwise, or with backend="torch";
- propagation (`propagate(...)`): the same backend as the clicks (onnxruntime needs the export's
  memory graphs; the same masks as torch voxel for voxel, docs/deploy.md);
- few-shot (`few_shot`): torch only (an export leaves the support-reading sources out), so it is
  offered for a run folder or a model, never for an export folder.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path

BACKENDS = ("auto", "torch", "onnx")


def onnxruntime_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


class Engine:
    """A loaded model and its backends (see the module doc). Build with `Engine.open`."""

    def __init__(self, model=None, export_dir: Path | None = None, name: str = "model",
                 trained_on=(), note: str = ""):  # fmt: skip
        self.model = model  # SAMed2Model (torch) or None (an export folder only)
        self.export_dir = export_dir  # an export folder for onnxruntime, or None
        self.name, self.trained_on, self.note = name, list(trained_on), note
        self._onnx = None  # one OnnxModel, shared by every tab (onnxruntime runs are thread-safe)
        self._propagation = None  # one OnnxPropagation (its sessions loaded once)

    @classmethod
    def open(cls, source, backend: str = "auto", image_size: int | None = None) -> Engine:
        """`source`: a run folder, an export folder or a SAMed2Model. Errors name the folder and
        the fix (a folder that is neither, a model that does not load)."""
        from samed2_kit.deploy.contract import is_export_dir

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {list(BACKENDS)}")
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"{path} is not a folder: pass a run folder (`samed2 quickstart` writes "
                    "runs/quickstart) or an export folder (`samed2 export RUN --out DIR`)"
                )
            if is_export_dir(path):
                if backend == "torch":
                    raise ValueError(f"{path} is an export folder: it runs on onnxruntime; "
                                     "pass its run folder for backend='torch'")  # fmt: skip
                from samed2_kit.deploy.runtime import OnnxModel

                onnx = OnnxModel(path)
                eng = cls(None, path, path.name, onnx.manifest.get("modalities", []),
                          "onnxruntime (export folder)")  # fmt: skip
                eng._onnx = onnx
                return eng
            from samed2_kit.model.assemble import load, read_manifest

            model = load(path).eval()
            name, trained_on = path.name, read_manifest(path).get("modalities", [])
        else:
            model, name, trained_on = source.eval(), "model", []
        eng = cls(model, None, name, trained_on, "torch")
        if backend != "torch" and onnxruntime_available():
            eng._export(image_size)
        elif backend == "onnx":
            from samed2_kit.deploy.contract import require

            require("onnxruntime")
        return eng

    def _export(self, image_size: int | None) -> None:
        """Export the torch model once into a temporary folder (removed with the engine)."""
        from samed2_kit.deploy.export import export_onnx

        tmp = Path(tempfile.mkdtemp(prefix="samed2-app-onnx-"))
        weakref.finalize(self, shutil.rmtree, tmp, True)
        t0 = time.perf_counter()
        print("[samed2] exporting the model to onnxruntime for fast clicks "
              "(--backend torch skips this) ...", flush=True)  # fmt: skip
        self.export_dir = export_onnx(self.model, tmp / "export", image_size=image_size)
        self.note = f"onnxruntime (exported in {time.perf_counter() - t0:.0f} s; few-shot: torch)"

    @property
    def backend(self) -> str:
        return "onnx" if self.export_dir is not None else "torch"

    @property
    def few_shot(self) -> bool:
        """Whether the model reads support examples (a hard_prototypes-like source)."""
        return self.model is not None and bool(self.model.support_sources())

    @property
    def image_size(self) -> int:
        return int(self.model.image_size) if self.model is not None else self.onnx().image_size

    def onnx(self):
        from samed2_kit.deploy.runtime import OnnxModel

        if self._onnx is None:
            self._onnx = OnnxModel(self.export_dir)
        return self._onnx

    def predictor(self, few_shot: bool = False):
        """A new Predictor (one per tab: it holds that tab's image embedding)."""
        from samed2_kit.model.predictor import Predictor

        if self.backend == "onnx" and not few_shot:
            return Predictor(self.onnx(), backend="onnx")
        if self.model is None:
            raise ValueError("few-shot needs the run folder (torch): an export folder has no "
                             "support-reading source; start the app on the run folder")  # fmt: skip
        return Predictor(self.model, backend="torch")

    def propagate(self, array, prompts: dict, modality: str, window, progress: bool = True):
        """`propagate_volume` on this engine's backend: (Z, H, W) bool."""
        from samed2_kit.volume import propagate_volume

        if self.backend == "onnx":
            if self._propagation is None:
                from samed2_kit.deploy.propagation import OnnxModelImagePath, OnnxPropagation

                image_path = OnnxModelImagePath(self.onnx())  # the clicks' sessions, shared
                self._propagation = OnnxPropagation(self.export_dir, image_path=image_path)
            return propagate_volume(self._propagation, array, prompts, modality=modality,
                                    window=window, backend="onnx", progress=progress)  # fmt: skip
        return propagate_volume(self.model, array, prompts, modality=modality, window=window,
                                progress=progress)  # fmt: skip

    def describe(self) -> str:
        return f"model **{self.name}**, backend {self.note}"
