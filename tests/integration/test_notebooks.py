"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Each is executed with nbclient on a `python3` kernel of this interpreter, from the notebooks
folder, with a tiny training budget (SAMED2_NB_STEPS) and no run folder to load (SAMED2_NB_RUN
points nowhere), so the in-notebook training path is the one exercised, as on a fresh checkout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_prompting.ipynb", "02_volume.ipynb", "03_few_shot.ipynb"]
CELL_TIMEOUT_S = 240
VOLUME_NOTEBOOK = "02_volume.ipynb"


def _volume_api_present() -> bool:
    """02_volume needs samed2_kit.volume (propagate_volume) and samed2_kit.export."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("samed2_kit.volume", "samed2_kit.export"))  # fmt: skip


def _notebook(name: str):
    path = NOTEBOOKS / name
    if name == VOLUME_NOTEBOOK and not (path.is_file() and _volume_api_present()):
        pytest.skip("02_volume needs samed2_kit.volume and samed2_kit.export")
    return nbformat.read(path, as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = _notebook(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has outputs (clear them)"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"


@pytest.mark.slow  # a Jupyter kernel per notebook, training in it
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    nb = _notebook(name)
    monkeypatch.setenv("SAMED2_NB_STEPS", "2")
    monkeypatch.setenv("SAMED2_NB_RUN", str(tmp_path / "no-run-folder"))  # train in the notebook
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what the notebook writes: under tmp_path
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name} drew no figure"
    # nothing written beside the notebooks, and the notebook's temporary folder is removed
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before
    assert not list(tmp_path.glob("samed2-nb-*"))
