"""`samed2 medbank build | info | verify` end to end on the bundled samples."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SAMED2 = [sys.executable, "-m", "samed2_kit.cli", "medbank"]

pytestmark = pytest.mark.slow  # `samed2 medbank` in subprocesses


def _run(*args):
    return subprocess.run(SAMED2 + list(args), capture_output=True, text=True, timeout=300)


def test_build_info_verify(tmp_path):
    store = tmp_path / "store"
    r = _run("build", str(REPO / "recipes" / "medbank_samples.yaml"), "--out", str(store))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "75 samples" in r.stdout and "| us | fetal_head | 13 | 29 | 3 | 35 | 45 |" in r.stdout
    assert "skipped" in r.stderr and "amos_0507_31.png" in r.stderr
    r = _run("info", str(store))
    assert r.returncode == 0 and "| ct | abdomen_ct_organs | 8 | 18 | 4 | 4 | 30 |" in r.stdout
    r = _run("verify", str(store))
    assert r.returncode == 0 and "OK (49 images, 75 samples, 39 cases)" in r.stdout
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["counts"][0]["samples"] = 0
    (store / "manifest.json").write_text(json.dumps(manifest))
    r = _run("verify", str(store))
    assert r.returncode == 1 and "counts differ" in r.stderr


def test_bad_spec_is_a_clear_error_and_writes_nothing(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "sources:\n  - {name: a, layout: folders, root: ., modality: ct, task: t, licence: x}\n"
    )
    r = _run("build", str(spec), "--out", str(tmp_path / "store"))
    assert r.returncode == 2 and "layout='folders'" in r.stderr
    r = _run("info", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "is not a medbank store" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]
