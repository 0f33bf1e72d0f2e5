"""medbank build hardening: parallel builds, stale temporaries, bad --out, damaged stores, manifest
counts, case_from, split_by slab, field-of-view column."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samed2_kit.cli import main
from samed2_kit.medbank.build import build
from samed2_kit.medbank.plan import slab_ranges
from samed2_kit.medbank.spec import load_spec
from samed2_kit.medbank.store import open_store, verify
from samed2_kit.utils.atomic import remove_stale

REPO = Path(__file__).resolve().parents[2]


def _volume(folder: Path, key: str, z: int = 6, size: int = 24, seed: int = 0, zs=(1, 4)):
    """A CT-like (z, size, size) NIfTI with label 1 (a square) on slices zs[0]..zs[1]-1."""
    rng = np.random.default_rng(seed)
    img = rng.normal(40, 200, (z, size, size)).astype(np.float32)
    lab = np.zeros((z, size, size), np.uint8)
    lab[zs[0] : zs[1], 6:16, 6:16] = 1
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), aff), str(folder / f"{key}_img.nii.gz"))
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), aff), str(folder / f"{key}_lab.nii.gz"))


def _src(name: str, root: str = "data", extra: str = "") -> str:
    return (
        f"  - {{name: {name}, layout: volumes, root: {root}, image: '{{id}}_img.nii.gz', "
        f"mask: '{{id}}_lab.nii.gz', labels: {{1: liver}}, modality: ct, task: liver, "
        f"licence: CC0{extra}}}\n"
    )


def _spec(folder: Path, sources: str, head: str = "split: {train: 0.5, test: 0.5}\n") -> Path:
    path = folder / "spec.yaml"
    path.write_text(f"{head}sources:\n{sources}")
    return path


def _build(spec_path: Path, out: Path, **kw):
    spec, sha = load_spec(spec_path)
    return build(spec, out, sha, progress=False, **kw)


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # dotfiles included


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["medbank", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# 1. parallel builds


def test_num_proc_2_builds_the_same_store(tmp_path, capsys):
    for k in range(4):
        _volume(tmp_path / "data", f"c{k}", seed=k)
    spec = _spec(tmp_path, _src("vols"))
    one = _build(spec, tmp_path / "one")
    rc, _ = _cli(capsys, "build", str(spec), "--out", str(tmp_path / "two"), "--num-proc", "2")
    assert rc == 0 and one.samples == 4 * 3
    a, b = _manifest(tmp_path / "one"), _manifest(tmp_path / "two")
    assert a["content_sha256"] == b["content_sha256"] and a["sources"] == b["sources"]
    assert verify(tmp_path / "two", progress=False).ok
    assert _listing(tmp_path) == ["data", "one", "spec.yaml", "two"]


def test_num_proc_must_be_positive(tmp_path, capsys):
    _volume(tmp_path / "data", "a")
    with pytest.raises(ValueError, match="--num-proc 0"):
        _build(_spec(tmp_path, _src("vols")), tmp_path / "store", num_proc=0)
    with pytest.raises(SystemExit):
        main(["medbank", "build", str(tmp_path / "spec.yaml"), "--out", "x", "--num-proc", "0"])
    assert "give a whole number of processes >= 1" in capsys.readouterr().err
    assert _listing(tmp_path) == ["data", "spec.yaml"]


# 2. stale temporaries and --out


_KILLED_BUILD = """
import sys, time
from pathlib import Path
import samed2_kit.medbank.cases as cases
from samed2_kit.medbank.build import build
from samed2_kit.medbank.spec import load_spec

real, calls = cases.slice_case, []

def slow(*a, **k):
    calls.append(1)
    if len(calls) == 2:
        Path(sys.argv[3]).write_text("started")
        time.sleep(120)
    return real(*a, **k)

cases.slice_case = slow
spec, sha = load_spec(sys.argv[1])
build(spec, sys.argv[2], sha, progress=False)
"""


def test_sigkilled_build_leftovers_are_removed_by_the_next_build(tmp_path, capsys):
    work = tmp_path / "work"
    for k in range(2):
        _volume(work / "data", f"c{k}", seed=k)
    spec = _spec(work, _src("vols"))
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_BUILD, str(spec), str(work / "store"), str(marker)],
        cwd=REPO,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the build in the subprocess did not start"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = [n for n in _listing(work) if n.startswith(".store.tmp-")]
    assert left and left[0].startswith(f".store.tmp-{proc.pid}-")  # what kill -9 leaves
    rc, _ = _cli(capsys, "build", str(spec), "--out", str(work / "store"))
    assert rc == 0 and _listing(work) == ["data", "spec.yaml", "store"]


def test_a_live_builds_temporary_is_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    try:
        live = tmp_path / f".store.tmp-{sleeper.pid}-abc"
        dead = tmp_path / f".store.tmp-{done.pid}-xyz"
        old = tmp_path / f".store.old-{done.pid}"
        other = tmp_path / f".other.tmp-{done.pid}-q"
        for p in (live, dead, old, other):
            p.mkdir()
        (old / "manifest.json").write_text("{}")
        assert remove_stale(tmp_path / "store") == [old, dead]
        # the previous version, moved aside by a writer killed mid-swap, is put back
        assert (tmp_path / "store" / "manifest.json").exists()
        assert _listing(tmp_path) == sorted([live.name, other.name, "store"])
        dead.mkdir()
        assert remove_stale(tmp_path / "store") == [dead] and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_out_naming_a_file_or_a_users_folder_is_refused(tmp_path, capsys):
    _volume(tmp_path / "data", "a")
    spec = _spec(tmp_path, _src("vols", extra=", split: {train: 1.0}"))
    (tmp_path / "notes.txt").write_text("keep me")
    rc, err = _cli(capsys, "build", str(spec), "--out", str(tmp_path / "notes.txt"))
    assert rc == 2 and "notes.txt is a file; give a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me too")
    rc, err = _cli(capsys, "build", str(spec), "--out", str(tmp_path / "mine"))
    assert rc == 2 and "is a folder with files that is not a medbank store" in err
    assert _listing(tmp_path / "mine") == ["thesis.tex"]
    rc, err = _cli(capsys, "build", str(spec), "--out", str(tmp_path / "notes.txt" / "store"))
    assert rc == 2 and "is a file, not a folder" in err
    assert _listing(tmp_path) == ["data", "mine", "notes.txt", "spec.yaml"]
    (tmp_path / "empty").mkdir()  # an empty folder, or a store, is fine
    assert _cli(capsys, "build", str(spec), "--out", str(tmp_path / "empty"))[0] == 0
    assert _cli(capsys, "build", str(spec), "--out", str(tmp_path / "empty"))[0] == 0
    assert _listing(tmp_path) == ["data", "empty", "mine", "notes.txt", "spec.yaml"]


def test_failed_parallel_build_leaves_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    for k in range(2):
        (tmp_path / "data" / f"x{k}_img.nii.gz").write_text("junk")
        (tmp_path / "data" / f"x{k}_lab.nii.gz").write_text("junk")
    with pytest.raises(ValueError, match="nothing usable remains"):
        _build(_spec(tmp_path, _src("vols")), tmp_path / "store", num_proc=2)
    assert _listing(tmp_path) == ["data", "spec.yaml"]


# 3. damaged stores


@pytest.mark.parametrize("table", ["images", "samples"])
def test_truncated_arrow_file_is_one_clear_error(tmp_path, capsys, table):
    _volume(tmp_path / "data", "a")
    _build(_spec(tmp_path, _src("vols", extra=", split: {train: 1.0}")), tmp_path / "store")
    shard = next((tmp_path / "store" / table).glob("*.arrow"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    for verb in ("info", "verify"):
        rc, err = _cli(capsys, verb, str(tmp_path / "store"))
        assert rc == 2 and f"{shard} is truncated or corrupt" in err
        assert "rebuild the store" in err
    shard.write_bytes(b"")
    rc, err = _cli(capsys, "verify", str(tmp_path / "store"))
    assert rc == 2 and f"{shard} is truncated or corrupt" in err


def test_info_and_verify_on_what_is_not_a_store(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    for verb in ("info", "verify"):
        rc, err = _cli(capsys, verb, str(tmp_path / "folder"))
        assert rc == 2 and "is not a medbank store" in err
        rc, err = _cli(capsys, verb, str(tmp_path / "nope"))
        assert rc == 2 and "does not exist" in err
    (tmp_path / "folder" / "images").mkdir()
    (tmp_path / "folder" / "samples").mkdir()
    (tmp_path / "folder" / "manifest.json").write_text("{not json")
    rc, err = _cli(capsys, "info", str(tmp_path / "folder"))
    assert rc == 2 and "manifest.json is not valid JSON" in err


# 4. manifest counts


def test_manifest_counts_cases_not_images(tmp_path):
    import cv2

    d = tmp_path / "pairs"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for key in ("001_a", "001_b", "002_a", "003_a", "003_b", "003_c"):
        img = np.full((16, 16), 80, np.uint8)
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 4:10] = 255
        cv2.imwrite(str(d / "images" / f"{key}.png"), img)
        cv2.imwrite(str(d / "masks" / f"{key}.png"), mask)
    src = (
        "  - {name: us, layout: pairs, root: pairs, image: 'images/{id}.png', "
        "mask: 'masks/{id}.png', case: '^(\\d+)_', modality: us, task: t, licence: CC0}\n"
    )
    _build(_spec(tmp_path, src, "split: {train: 0.67, test: 0.33}\n"), tmp_path / "store")
    (info,) = _manifest(tmp_path / "store")["sources"]
    assert (info["cases"], info["images"], info["samples"]) == (3, 6, 6)


# 5. case_from


def test_case_from_shares_case_ids_and_splits(tmp_path):
    for k in range(6):
        _volume(tmp_path / "ct", f"s{k}", seed=k)
        _volume(tmp_path / "mr", f"s{k}", seed=10 + k)
    sources = _src("ct", "ct") + _src("mr", "mr", ", case_from: ct")
    _build(_spec(tmp_path, sources), tmp_path / "store")
    _, _, samples = open_store(tmp_path / "store")
    split_of: dict[str, set] = {}
    for ds, case, split in zip(
        samples["dataset"], samples["case_id"], samples["split"], strict=True
    ):
        assert case.startswith("ct/")  # mr's cases live in ct's namespace
        split_of.setdefault(case, set()).add((ds, split))
    assert len(split_of) == 6
    for case, seen in split_of.items():
        assert {ds for ds, _ in seen} == {"ct", "mr"}
        assert len({s for _, s in seen}) == 1, (case, seen)  # one split across both sources
    assert {s for seen in split_of.values() for _, s in seen} == {"train", "test"}
    assert verify(tmp_path / "store", progress=False).ok
    sources_info = _manifest(tmp_path / "store")["sources"]
    assert [(s["cases"], s["images"], s.get("case_from")) for s in sources_info] == [
        (6, 6, None),
        (6, 6, "ct"),
    ]


def test_case_from_conflicts_are_errors_before_any_work(tmp_path):
    _volume(tmp_path / "ct", "s0")
    bad_split = _src("ct", "ct") + _src("mr", "ct", ", case_from: ct, split: {train: 1.0}")
    with pytest.raises(ValueError, match="split .* differs from 'ct'"):
        _build(_spec(tmp_path, bad_split), tmp_path / "store")
    slab = _src("ct", "ct", ", split_by: slab") + _src("mr", "ct", ", case_from: ct")
    with pytest.raises(ValueError, match="split_by slab"):
        _build(_spec(tmp_path, slab), tmp_path / "store")
    assert _listing(tmp_path) == ["ct", "spec.yaml"]


# 6. split_by slab


def test_slab_ranges():
    fr = {"train": 0.6, "val": 0.2, "test": 0.2}
    assert slab_ranges(list(range(2, 12)), 20, fr) == [
        ("train", 0, 8),
        ("val", 8, 10),
        ("test", 10, 20),
    ]
    assert slab_ranges([5, 6], 10, fr) == [("train", 0, 6), ("val", 6, 10)]  # too few slices
    assert slab_ranges([3], 5, {"train": 0.0, "test": 1.0}) == [("test", 0, 5)]


def test_split_by_slab_keeps_slabs_apart(tmp_path):
    _volume(tmp_path / "data", "a", z=20, zs=(2, 18))
    head = "split: {train: 0.6, val: 0.2, test: 0.2}\nclip_radius: 2\n"
    _build(_spec(tmp_path, _src("vols", extra=", split_by: slab"), head), tmp_path / "store")
    manifest, images, samples = open_store(tmp_path / "store")
    assert verify(tmp_path / "store", progress=False).ok  # neighbours in their case, no leakage
    z_of = {}
    for row in samples:
        case, split = row["case_id"], row["split"]
        assert case == f"vols/a@{split}"
        z_of.setdefault(split, []).append(row["slice_index"])
        for n in row["neighbors"]:  # never a slice of another slab
            assert images[n]["case_id"] == case and images[n]["split"] == split
    assert sorted(z_of["train"]) == list(range(2, 12))  # 16 labelled slices: 10 / 3 / 3
    assert sorted(z_of["val"]) == [12, 13, 14] and sorted(z_of["test"]) == [15, 16, 17]
    # a sample on the slab's last slice repeats it, as at a volume's end
    last = next(r for r in samples if r["case_id"] == "vols/a@train" and r["slice_index"] == 11)
    assert [images[n]["slice_index"] for n in last["neighbors"]] == [9, 10, 11, 11, 11]
    first = next(r for r in samples if r["case_id"] == "vols/a@val" and r["slice_index"] == 12)
    assert [images[n]["slice_index"] for n in first["neighbors"]] == [12, 12, 12, 13, 14]
    nums = {r["case_id"]: r["num_slices"] for r in images}
    assert nums == {"vols/a@train": 12, "vols/a@val": 3, "vols/a@test": 5}
    (info,) = manifest["sources"]
    assert (info["cases"], info["images"], info["split_by"]) == (3, 1, "slab")


# 7. field of view


def test_fov_column(tmp_path, monkeypatch):
    from datasets import load_from_disk

    import samed2_kit.medbank.cases as cases

    _volume(tmp_path / "data", "a", size=40)
    spec = _spec(tmp_path, _src("vols", extra=", split: {train: 1.0}"), "max_size: 20\n")
    plain = _build(spec, tmp_path / "plain")
    real = cases.slice_case

    def with_fov(*a, **k):
        sliced = real(*a, **k)
        fov = np.zeros(sliced.images.shape[:3], bool)
        fov[:, 4:36, 8:32] = True
        sliced.fov = fov
        return sliced

    monkeypatch.setattr(cases, "slice_case", with_fov)
    _build(spec, tmp_path / "fov")
    assert plain.images == 6
    _, images, _ = open_store(tmp_path / "fov")
    fov = np.asarray(images[0]["fov"])
    assert fov.shape == np.asarray(images[0]["image"]).shape == (20, 20)  # resized like masks
    assert set(np.unique(fov)) == {0, 255} and (fov > 0).sum() == 16 * 12
    assert verify(tmp_path / "fov", progress=False).ok
    plain_m, fov_m = _manifest(tmp_path / "plain"), _manifest(tmp_path / "fov")
    assert plain_m["content_sha256"]["images"] != fov_m["content_sha256"]["images"]
    assert plain_m["content_sha256"]["samples"] == fov_m["content_sha256"]["samples"]
    _, images, _ = open_store(tmp_path / "plain")
    assert images[0]["fov"] is None  # no fov: the whole image
    # a store written before the column existed reads and verifies
    old = load_from_disk(str(tmp_path / "plain" / "images")).remove_columns("fov")
    old.save_to_disk(str(tmp_path / "images_old"))
    import shutil

    shutil.rmtree(tmp_path / "plain" / "images")
    (tmp_path / "images_old").rename(tmp_path / "plain" / "images")
    assert "fov" not in open_store(tmp_path / "plain")[1].column_names
    assert verify(tmp_path / "plain", progress=False).ok
