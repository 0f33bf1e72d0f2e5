"""The bad-input corpus: every bad input a new user met in a sweep (and those the focused tests
cover), each through the CLI as the user typed it. Each case must exit with its code (2: refused
before doing anything), print no traceback, name the file or key at fault in its message, and leave
every file in the workspace as it was (no partial output, nothing hidden left behind).

A case is a function of the workspace returning (argv, substrings the message must hold); it
writes its own bad files into the workspace first. The focused tests next to this module check
each rule's details; this one is the user's view, all in one place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from samed2_kit.cli import main

REPO = Path(__file__).resolve().parents[2]
HC18 = REPO / "samed2_kit" / "sample_data" / "hc18"


@dataclass
class Workspace:
    """A fresh folder per case with a trained-shaped run folder (`run`), a 64x48 grey PNG
    (`image`), a good prompts file (`prompts`) and a built store outside it (`store`: HC18)."""

    root: Path
    run: Path
    image: Path
    prompts: Path
    store: Path

    def file(self, name: str, data: str | bytes | dict | list) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, dict | list):
            data = json.dumps(data)
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return str(path)

    def png(self, name: str, array: np.ndarray) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), array)
        return str(path)


Case = Callable[[Workspace], tuple[list[str], list[str]]]
CASES: dict[str, tuple[Case, int]] = {}


def case(name: str, code: int = 2):
    def register(fn: Case) -> Case:
        CASES[name] = (fn, code)
        return fn

    return register


# --- samed2 predict: prompts and images -------------------------------------------------------


def _predict(w: Workspace, prompts: dict | str, image: str | None = None, *extra: str):
    p = w.file("p.json", prompts) if not isinstance(prompts, str) else prompts
    argv = ["predict", str(w.run), image or str(w.image), "--prompts", p]
    return argv + ["--out", str(w.root / "out"), *extra]


PROMPT_CASES = {
    "empty-lists": ({"points": [], "labels": []}, ["the prompt is empty", "box"]),
    "empty-object": ({}, ["give a box and/or points"]),
    "nan-box": ('{"box": [NaN, 5, 40, 30]}', ["box", "NaN or infinite"]),
    "inf-point": ('{"points": [[Infinity, 5]]}', ["points", "NaN or infinite"]),
    "text-coordinate": ({"box": ["8", 6, 40, 30]}, ["text values"]),
    "label-5": ({"points": [[20, 20]], "labels": [5]}, ["1 = foreground, 0 = background"]),
    "labels-count": ({"points": [[20, 20], [30, 30]], "labels": [1]}, ["2 points but 1 labels"]),
    "labels-no-points": ({"box": [8, 6, 40, 30], "labels": [1]}, ["labels given without points"]),
    "nested-points": ({"points": [[[20, 20]]]}, ["points must be a list of [x, y]"]),
    "box-outside": ({"box": [8, 6, 400, 30]}, ["outside the 64x48"]),
    "point-outside": ({"points": [[20, -1]]}, ["points", "outside the 64x48"]),
    "unknown-key": ({"bbox": [1, 2, 3, 4]}, ["unknown keys ['bbox']"]),
    "bad-json": ('{"box": [1, 2, 3', ["p.json", "not valid JSON"]),
}


def _prompt_case(data, message):
    def make(w: Workspace):
        p = w.file("p.json", data) if isinstance(data, str) else data
        return _predict(w, p), message

    return make


for _name, (_data, _message) in PROMPT_CASES.items():
    case(f"predict/{_name}")(_prompt_case(_data, _message))


@case("predict/image-1x1")
def _tiny_image(w):
    return _predict(w, {"box": [0, 0, 0, 0]}, w.png("tiny.png", np.zeros((1, 1), np.uint8))), [
        "tiny.png",
        "at least 8 px",
    ]


@case("predict/not-an-image")
def _not_an_image(w):
    return _predict(w, {"box": [1, 1, 5, 5]}, w.file("notes.png", b"hello, not a png")), [
        "notes.png"
    ]


@case("predict/series-uid-on-png")
def _series_uid_png(w):
    return _predict(w, {"box": [8, 6, 40, 30]}, None, "--series-uid", "1.2.3"), ["--series-uid"]


@case("predict/two-dicom-series")
def _two_series(w):
    from tests._dicom import write_series

    for uid in ("1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102"):
        write_series(w.root / "dcm", uid)
    prompts = {"slices": {"1": {"box": [4, 4, 11, 11]}}}
    return _predict(w, prompts, str(w.root / "dcm")), ["dcm", "2 series", "--series-uid"]


@case("predict/output-is-the-input")
def _out_is_input(w):
    argv = ["predict", str(w.run), str(w.image), "--prompts", str(w.prompts)]
    return argv + ["--out", str(w.image)], [str(w.image), "--overwrite"]


@case("predict/output-exists")
def _out_exists(w):
    out = w.file("old_mask.png", b"an earlier result")
    argv = ["predict", str(w.run), str(w.image), "--prompts", str(w.prompts), "--out", out]
    return argv, ["old_mask.png exists", "--overwrite"]


@case("predict/missing-run")
def _missing_run(w):
    argv = ["predict", str(w.root / "no_run"), str(w.image), "--prompts", str(w.prompts)]
    return argv + ["--out", str(w.root / "out")], ["no_run"]


# --- samed2 medbank build: specs and sources ---------------------------------------------------

GOOD_SOURCE = {
    "name": "hc",
    "layout": "pairs",
    "root": str(HC18),
    "image": "images/00{id}HC.png",
    "mask": "masks/00{id}HC_Annotation.png",
    "modality": "us",
    "task": "fetal_head",
    "licence": "CC-BY-4.0",
}


def _build(w: Workspace, spec: dict | str):
    import yaml

    text = spec if isinstance(spec, str) else yaml.safe_dump(spec)
    path = w.file("spec.yaml", text)
    return ["medbank", "build", path, "--out", str(w.root / "store")]


def _source(**change) -> dict:
    src = dict(GOOD_SOURCE, **change)
    return {"sources": [{k: v for k, v in src.items() if v is not None}]}


SPEC_CASES = {
    "no-licence": (_source(licence=None), ["spec.yaml", "sources[0].licence missing"]),
    "no-sources": ({"name": "x"}, ["spec.yaml", "sources missing"]),
    "bad-layout": (_source(layout="folder"), ["spec.yaml", "layout='folder'"]),
    "bad-modality": (_source(modality="ultrasound"), ["unknown modality 'ultrasound'"]),
    "split-sum": (
        {**_source(), "split": {"train": 0.8, "val": 0.5}},
        ["spec.yaml", "split", "sums to 1.3"],
    ),
    "mask-threshold": (_source(mask_threshold=300), ["mask_threshold"]),
    "spacing-negative": (_source(spacing=-1), ["spacing", "pixel size in mm"]),
    "case-no-group": (_source(case="^\\d+"), ["case", "has no group"]),
    "colours-with-label": (
        _source(mask="masks/00{id}HC_{label}.png", mask_colors={"a": [255, 0, 0]}),
        ["mask_colors", "{label}"],
    ),
    "unknown-key": (_source(mask_treshold=100), ["mask_treshold"]),
    "not-yaml": ("sources: [\n  - {name: x", ["spec.yaml", "not valid YAML"]),
    "image-matches-nothing": (
        _source(image="images/{id}.jpg", mask="masks/{id}_Annotation.png"),
        ["images/{id}.jpg", "matched no file", "nothing usable remains"],
    ),
    "root-missing": (_source(root="/no/such/folder"), ["/no/such/folder", "does not exist"]),
}


def _spec_case(spec, message):
    return lambda w: (_build(w, spec), message)


for _name, (_spec, _message) in SPEC_CASES.items():
    case(f"medbank-build/{_name}")(_spec_case(_spec, _message))


def _pair_folder(w: Workspace, mask: np.ndarray, n: int = 2) -> dict:
    for i in range(n):
        w.png(f"pairs/img/{i}.png", np.full((32, 32), 100, np.uint8))
        w.png(f"pairs/mask/{i}.png", mask)
    src = dict(GOOD_SOURCE, root=str(w.root / "pairs"), image="img/{id}.png")
    return {"sources": [dict(src, mask="mask/{id}.png")]}


@case("medbank-build/colour-mask")
def _colour_mask(w):
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[4:12, 4:12] = (0, 0, 255)  # red in BGR
    mask[20:28, 20:28] = (0, 255, 0)
    return _build(w, _pair_folder(w, mask)), ["colour mask", "mask_channel", "mask_colors"]


@case("medbank-build/fov-missing")
def _fov_missing(w):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 255
    spec = _pair_folder(w, mask)
    w.png("pairs/fov/0.png", np.full((32, 32), 255, np.uint8))
    spec["sources"][0]["fov"] = "fov/{id}.png"
    spec["sources"][0]["split"] = {"train": 1.0}
    (w.root / "pairs" / "img" / "0.png").unlink()  # the one image with a FOV has no pair now
    (w.root / "pairs" / "mask" / "0.png").unlink()
    return _build(w, spec), ["field-of-view mask", "1.png", "fov"]


@case("medbank-build/out-is-a-file")
def _out_file(w):
    argv = _build(w, _source())
    out = w.file("store", "a file the user keeps")
    return argv[:-1] + [out], ["is a file; give a folder"]


@case("medbank-build/out-is-a-user-folder")
def _out_user_folder(w):
    argv = _build(w, _source())
    w.file("store/thesis.tex", "years of work")
    return argv, ["is a folder with files that is not a medbank store"]


@case("medbank-build/case-from-slab")
def _case_from_slab(w):
    spec = {"sources": [GOOD_SOURCE, dict(GOOD_SOURCE, name="b", case_from="hc", split_by="slab")]}
    return _build(w, spec), ["split_by slab"]


@case("medbank-build/case-from-later-source")
def _case_from_later(w):
    spec = {"sources": [dict(GOOD_SOURCE, case_from="b"), dict(GOOD_SOURCE, name="b")]}
    return _build(w, spec), ["case_from='b'", "listed before it"]


def _copied_store(w: Workspace) -> Path:
    store = w.root / "store"
    shutil.copytree(w.store, store)
    return store


@case("medbank-verify/truncated-arrow")
def _truncated_arrow(w):
    store = _copied_store(w)
    arrow = sorted((store / "samples").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    return ["medbank", "verify", str(store)], [arrow.name, "rebuild the store"]


@case("medbank-info/truncated-arrow")
def _info_truncated(w):
    store = _copied_store(w)
    arrow = sorted((store / "images").glob("*.arrow"))[0]
    arrow.write_bytes(b"")
    return ["medbank", "info", str(store)], [arrow.name, "rebuild the store"]


@case("medbank-info/not-a-store")
def _not_a_store(w):
    w.file("folder/readme.txt", "hello")
    return ["medbank", "info", str(w.root / "folder")], ["folder", "is not a medbank store"]


@case("medbank-info/manifest-not-json")
def _manifest_broken(w):
    store = _copied_store(w)
    (store / "manifest.json").write_text("{")
    return ["medbank", "info", str(store)], ["manifest.json is not valid JSON"]


# --- samed2 train / eval / memory: recipes, run folders, weights, banks --------------------------

RECIPE = """model: {{variant: test-tiny, image_size: 256}}
data: {{store: {store}, tasks: [fetal_head]}}
train: {{steps: 1, batch_size: 2}}
"""


def _train(w: Workspace, *overrides: str, recipe: str | None = None) -> list[str]:
    path = recipe or w.file("recipe.yaml", RECIPE.format(store=w.store))
    return ["train", path, "--out", str(w.root / "new_run"), *overrides]


TRAIN_CASES = {
    "override-without-equals": (("train.steps", "5"), ["train.steps", "is not key=value"]),
    "negative-lr": (("train.lr=-0.001",), ["train.lr=-0.001", "must be > 0"]),
    "override-not-yaml": (("train.steps=[1,",), ["'[1,' is not valid YAML"]),
    "variant": (("model.variant=huge",), ["model.variant", "huge"]),
    "image-size": (("model.image_size=300",), ["image_size", "300"]),
    "unknown-task": (("data.tasks=[nope]",), ["data.tasks", "nope"]),
    "eval-split": (("eval.split=nosplit",), ["no split 'nosplit'"]),
    "missing-checkpoint": (("model.checkpoint=missing.pt",), ["model.checkpoint", "missing.pt"]),
}


def _train_case(overrides, message):
    return lambda w: (_train(w, *overrides), message)


for _name, (_over, _message) in TRAIN_CASES.items():
    case(f"train/{_name}")(_train_case(_over, _message))


@case("train/recipe-is-a-folder")
def _recipe_folder(w):
    (w.root / "recipes").mkdir()
    return _train(w, recipe=str(w.root / "recipes")), ["recipes", "is a folder"]


@case("train/recipe-is-a-list")
def _recipe_list(w):
    return _train(w, recipe=w.file("list.yaml", "- a\n")), ["list.yaml", "a list, not a mapping"]


@case("train/recipe-binary")
def _recipe_binary(w):
    return _train(w, recipe=w.file("bin.yaml", b"\xff\xfe\x00")), ["bin.yaml", "read as text"]


@case("train/checkpoint-random-bytes")
def _random_pt(w):
    pt = w.file("rand.pt", np.random.default_rng(0).bytes(4096))
    return _train(w, f"model.checkpoint={pt}"), ["rand.pt", "not a PyTorch checkpoint"]


@case("train/checkpoint-truncated-run")
def _truncated_checkpoint(w):
    _truncate(w.run / "model.safetensors")
    return _train(w, f"model.checkpoint={w.run}"), ["model.safetensors", "model.checkpoint"]


@case("train/store-inside-the-run")
def _store_inside(w):
    return _train(w, f"data.store={w.root / 'new_run' / 'store'}"), ["inside the run folder"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@case("eval/truncated-weights")
def _eval_truncated(w):
    _truncate(w.run / "model.safetensors")
    return ["eval", str(w.run), str(w.store)], ["model.safetensors", "sha256"]


@case("eval/garbled-header-no-digest")
def _eval_garbled(w):
    meta = json.loads((w.run / "model.json").read_text())
    meta.pop("files", None)
    (w.run / "model.json").write_text(json.dumps(meta))
    data = bytearray((w.run / "model.safetensors").read_bytes())
    data[8:40] = b"x" * 32
    (w.run / "model.safetensors").write_bytes(bytes(data))
    return ["eval", str(w.run), str(w.store)], ["model.safetensors", "not a safetensors file"]


@case("predict/flipped-weight-bytes")
def _flipped(w):
    data = bytearray((w.run / "model.safetensors").read_bytes())
    data[-100:-90] = bytes(10)
    (w.run / "model.safetensors").write_bytes(bytes(data))
    argv = ["predict", str(w.run), str(w.image), "--prompts", str(w.prompts)]
    return argv + ["--out", str(w.root / "out")], ["does not match", "model.json"]


@case("predict/model-json-not-json")
def _bad_model_json(w):
    (w.run / "model.json").write_text("{not json")
    argv = ["predict", str(w.run), str(w.image), "--prompts", str(w.prompts)]
    return argv + ["--out", str(w.root / "out")], ["model.json", "not valid JSON"]


@case("memory-info/nan-bank")
def _nan_bank(w):
    from tests._damage import memory_bank, rewrite_safetensors

    path = w.root / "memory.safetensors"
    memory_bank(path)
    rewrite_safetensors(path, "conf", lambda t: t.fill_(float("nan")), lambda h: h.pop("digest"))
    return ["memory", "info", str(path)], ["memory.safetensors", "NaN or inf"]


@case("memory-prune/altered-bank")
def _altered_bank(w):
    from tests._damage import memory_bank, rewrite_safetensors

    path = w.root / "memory.safetensors"
    memory_bank(path)
    rewrite_safetensors(path, "features", lambda t: t.mul_(2))
    return ["memory", "prune", str(path), "--keep", "1"], ["memory.safetensors", "sha256"]


# --- the corpus runner ---------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`, hidden ones included: path -> (size, mtime_ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    import torch

    from samed2_kit.model import build_model
    from samed2_kit.model.assemble import save

    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=256).eval()
    return save(model, tmp_path_factory.mktemp("corpus") / "run", {"recipe": {}})


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_ends_in_one_clear_error(name, trained_run, hc18_store, tmp_path, capsys):
    make, code = CASES[name]
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = tmp_path / "image.png"
    img = np.zeros((48, 64), np.uint8)
    img[10:30, 15:45] = 200
    cv2.imwrite(str(image), img)
    prompts = tmp_path / "good.json"
    prompts.write_text(json.dumps({"box": [15, 10, 44, 29]}))
    argv, message = make(Workspace(tmp_path, run, image, prompts, Path(hc18_store)))
    before = _listing(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == code, f"exit {rc}, expected {code}; stderr:\n{err}"
    assert "Traceback" not in err
    for text in message:
        assert text in err, f"{text!r} not in the message:\n{err}"
    assert _listing(tmp_path) == before, "the workspace changed"
