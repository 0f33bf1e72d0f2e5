"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Each is executed with nbclient on a `python3` kernel of this interpreter, from the notebooks
folder, with a tiny training budget (SAMED2_NB_STEPS) and no run folder to load (SAMED2_NB_RUN
points nowhere), so the in-notebook training path is the one exercised, as on a fresh checkout.
The environment variables the notebooks read are the ones docs/prompting.md documents, and the
input variables (SAMED2_NB_IMAGE, _LABEL, _BOX, _SLICE, _MODALITY, _WINDOW) are run as well.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_prompting.ipynb", "02_volume.ipynb", "03_few_shot.ipynb"]
CELL_TIMEOUT_S = 240
VOLUME_NOTEBOOK = "02_volume.ipynb"
SAMPLES = REPO / "samed2_kit" / "sample_data"
DOC = REPO / "docs" / "prompting.md"
READ = re.compile(r"""os\.environ(?:\.get\(|\[)\s*["'](SAMED2_NB_\w+)["']""")


def _volume_api_present() -> bool:
    """02_volume needs samed2_kit.volume (propagate_volume) and samed2_kit.export."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("samed2_kit.volume", "samed2_kit.export"))  # fmt: skip


def _notebook(name: str):
    path = NOTEBOOKS / name
    if name == VOLUME_NOTEBOOK and not (path.is_file() and _volume_api_present()):
        pytest.skip("02_volume needs samed2_kit.volume and samed2_kit.export")
    return nbformat.read(path, as_version=4)


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


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


def _documented() -> dict[str, set[str]]:
    """{variable: {"01", "02", ...}} from the table in docs/prompting.md's Notebooks section."""
    section = DOC.read_text().split("## Notebooks", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(SAMED2_NB_\w+)` \| ([\d, ]+) \|", section, flags=re.M)
    assert rows, f"no SAMED2_NB_ table in {DOC}'s Notebooks section"
    return {var: {n.strip() for n in nbs.split(",")} for var, nbs in rows}


@pytest.mark.parametrize("name", NAMES)
def test_documented_variables_are_the_ones_read(name):
    """docs/prompting.md's table names exactly the variables each notebook reads, the notebook's
    first cell (its own table) names them too, and no other SAMED2_NB_ name appears."""
    nb = _notebook(name)
    read = set(READ.findall(_code(nb)))
    assert read, f"{name} reads no SAMED2_NB_ variable"
    documented = {var for var, nbs in _documented().items() if name[:2] in nbs}
    assert read == documented, f"{name} reads {sorted(read)}; {DOC.name} says {sorted(documented)}"
    intro = nb.cells[0]
    assert intro.cell_type == "markdown"
    assert set(re.findall(r"`(SAMED2_NB_\w+)`", intro.source)) == read, f"{name}: first cell"
    mentioned = set(re.findall(r"SAMED2_NB_\w+", "\n".join(c.source for c in nb.cells)))
    assert mentioned <= read, f"{name} mentions {sorted(mentioned - read)} but never reads them"


def _execute(name: str, tmp_path, monkeypatch, env: dict[str, str] | None = None):
    """Run the notebook with 2 training steps, no run folder and `env`; returns it executed."""
    nb = _notebook(name)
    monkeypatch.setenv("SAMED2_NB_STEPS", "2")
    monkeypatch.setenv("SAMED2_NB_RUN", str(tmp_path / "no-run-folder"))  # train in the notebook
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # what the notebook writes: under tmp_path
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    finally:  # nothing written beside the notebooks
        assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, f"{name} drew no figure"
    assert not list(tmp_path.glob("samed2-nb-*"))  # the notebook's temporary folder is removed
    return nb


def _text(nb) -> str:
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow  # a Jupyter kernel per notebook, training in it
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    _execute(name, tmp_path, monkeypatch)


@pytest.mark.slow
def test_volume_notebook_on_a_given_volume_and_label(tmp_path, monkeypatch):
    """SAMED2_NB_IMAGE + SAMED2_NB_LABEL: the bundled CT crop and its label map (non-zero: the
    object), CT intensities with SAMED2_NB_MODALITY and SAMED2_NB_WINDOW."""
    totalseg = SAMPLES / "totalseg"
    env = {"SAMED2_NB_IMAGE": str(totalseg / "example_ct_sm.nii.gz"),
           "SAMED2_NB_LABEL": str(totalseg / "example_seg.nii.gz"),
           "SAMED2_NB_MODALITY": "ct", "SAMED2_NB_WINDOW": "40,400"}  # fmt: skip
    text = _text(_execute(VOLUME_NOTEBOOK, tmp_path, monkeypatch, env))
    assert "example_ct_sm.nii.gz: (30, " in text and "3D Dice" in text and "extruded box" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_on_a_given_image_and_box(name, tmp_path, monkeypatch):
    """SAMED2_NB_IMAGE with no label: the prompt is SAMED2_NB_BOX (+ SAMED2_NB_SLICE in 02); the
    notebooks run without a reference (no Dice)."""
    if name == VOLUME_NOTEBOOK:
        env = {"SAMED2_NB_IMAGE": str(SAMPLES / "totalseg" / "example_mr_sm.nii.gz"),
               "SAMED2_NB_BOX": "30,20,80,60", "SAMED2_NB_SLICE": "10",
               "SAMED2_NB_MODALITY": "mr"}  # fmt: skip
    else:
        env = {"SAMED2_NB_IMAGE": str(SAMPLES / "hc18" / "images" / "024_HC.png"),
               "SAMED2_NB_BOX": "200,100,600,450"}  # fmt: skip
    text = _text(_execute(name, tmp_path, monkeypatch, env))
    assert "Dice" not in text  # no label: nothing to score against


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_without_a_prompt_names_the_variables(name, tmp_path, monkeypatch):
    """SAMED2_NB_IMAGE alone: the first cell stops, naming SAMED2_NB_LABEL and SAMED2_NB_BOX."""
    env = {"SAMED2_NB_IMAGE": str(SAMPLES / "hc18" / "images" / "024_HC.png")}
    with pytest.raises(nbclient.exceptions.CellExecutionError) as err:
        _execute(name, tmp_path, monkeypatch, env)
    assert "SAMED2_NB_LABEL" in str(err.value) and "SAMED2_NB_BOX" in str(err.value)
