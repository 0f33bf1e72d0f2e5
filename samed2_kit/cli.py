"""`samed2`: the command line.

samed2 quickstart [--checkpoint PATH] [--out DIR] [key=value ...]
samed2 train RECIPE.yaml [--out DIR] [--resume | --overwrite] [key=value ...]
samed2 eval RUN_DIR [STORE] [--split S] [--protocol P] [--clicks K] [--out DIR] [key=value ...]
samed2 predict RUN_DIR INPUT [--prompts P.json] [--out PATH] [--format F] [--support IMG MASK]
               [--series-uid UID]
samed2 medbank build|info|verify ...
samed2 memory info|prune|export BANK ...
samed2 export RUN_DIR --out DIR [--format onnx] [--image-size S] [--opset N] [--overwrite]
samed2 info
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samed2_kit.config import EVAL_PROTOCOLS, PREDICT_FORMATS

REPO_RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _quickstart_recipe() -> Path:
    path = REPO_RECIPES / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a clone of samed2-kit installed with "
            "`bash scripts/install.sh`, or use `samed2 train path/to/quickstart.yaml`"
        )
    return path


def cmd_quickstart(args) -> int:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"model.checkpoint={args.checkpoint}")
    recipe = load_recipe(_quickstart_recipe(), overrides)
    summary = run_recipe(recipe, args.out, resume=args.resume, overwrite=not args.resume)
    o = summary.get("overall")
    if o and o["dice"] <= o["box_dice"]:
        print("[samed2] note: the model did not beat the box baseline on this run", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.continual is not None:
        from samed2_kit.engine.continual import run_continual

        run_continual(recipe, args.out, resume=args.resume, overwrite=args.overwrite)
    else:
        run_recipe(recipe, args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def _eval_recipe(folder: Path, args):
    """The recipe to evaluate with: --recipe, else the one saved in model.json; key=value overrides
    and then the --split/--protocol/--clicks options applied to it."""
    import dataclasses

    from samed2_kit.config import Recipe, apply_overrides, from_dict, load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
    else:
        from samed2_kit.model.assemble import read_manifest

        meta = folder / "model.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta} not found: WEIGHTS must be a run folder written by `samed2 train` "
                "(model.safetensors + model.json)"
            )
        saved = read_manifest(folder)  # names the file when it is not valid JSON
        if not isinstance(saved.get("recipe"), dict):
            raise ValueError(f"{meta} holds no recipe: pass --recipe RECIPE.yaml")
        source = f"{meta} (+ overrides)" if args.overrides else str(meta)
        recipe = from_dict(Recipe, apply_overrides(saved["recipe"], args.overrides), "", source)
    options = {"split": args.split, "prompt": args.protocol, "clicks": args.clicks}
    options = {k: v for k, v in options.items() if v is not None}
    recipe.eval = dataclasses.replace(recipe.eval, **options)
    return recipe


def cmd_eval(args) -> int:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine import report
    from samed2_kit.engine.items import model_supports
    from samed2_kit.medbank.store import default_store
    from samed2_kit.model.assemble import load as load_model

    run = Path(args.weights)
    if not run.exists():
        raise FileNotFoundError(f"WEIGHTS {run} does not exist: pass a run folder")
    folder = run if run.is_dir() else run.parent
    if args.data and "=" in args.data and not Path(args.data).exists():
        args.overrides, args.data = [args.data, *args.overrides], None  # a key=value, not DATA
    recipe = _eval_recipe(folder, args)
    cfg = recipe.eval
    store = args.data or recipe.data.store or str(default_store(folder))
    out = Path(args.out) if args.out else folder / f"eval-{cfg.split}-{cfg.prompt}"
    # under `accelerate launch` this joins the process group (CPU ranks need ACCELERATE_USE_CPU)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    items = ev.eval_items(store, cfg, recipe.data.tasks)
    model = load_model(folder, device=state.device)
    d = recipe.data
    sup = model_supports(model, store, d.train_split, d.tasks, cfg.supports)
    rows, _ = ev.evaluate(model, items, cfg, progress=state.is_main_process, supports=sup)
    if state.is_main_process:
        summary = ev.summarize(rows)
        info = _eval_info(
            folder, store, cfg, state.num_processes, summary["overall"].get("unit", "mm")
        )
        written = report.write_eval(out, rows, summary, info)
        print(f"[samed2] eval {cfg.prompt} on {store}, split {cfg.split}: {len(rows)} samples, "
              f"{state.num_processes} process(es)")  # fmt: skip
        print("\n".join(report.metrics_table({**summary["per_task"], "all": summary["overall"]})))
        print("\n".join(report.metrics_table(summary["per_modality"], first="modality")))
        print(f"[samed2] eval written to {out}: {', '.join(p.name for p in written)}")
    state.wait_for_everyone()
    if state.num_processes > 1:
        state.destroy_process_group()
    return 0


def _eval_info(folder: Path, store: str, cfg, processes: int, unit: str = "mm") -> dict:
    """Set-up lines of summary.md / summary.json; `unit` of the distances ("mm", "px", "mm+px")."""
    from samed2_kit.engine.report import nsd_tolerance_text

    tol = f"{cfg.nsd_tolerance_mm} mm" + "".join(
        f", {m}: {t} mm" for m, t in sorted(cfg.nsd_tolerance_by_modality.items())
    )
    tol = nsd_tolerance_text(tol, unit)
    info = {"name": folder.name, "weights": str(folder), "store": store, "split": cfg.split}
    info["protocol"] = cfg.prompt
    if cfg.prompt.endswith("+clicks"):
        info["clicks"] = cfg.clicks
    info |= {"nsd_tolerance": tol, "max_items_per_task": cfg.max_items, "processes": processes}
    return info


def cmd_info(args) -> int:
    import torch

    from samed2_kit import __version__
    from samed2_kit.model.build import VARIANTS

    print(f"samed2-kit {__version__}; torch {torch.__version__}; cuda {torch.cuda.is_available()}")
    print(f"variants: {', '.join(VARIANTS)}")
    return 0


def cmd_predict(args) -> int:
    from samed2_kit.deploy.contract import is_export_dir
    from samed2_kit.model.assemble import load as load_model
    from samed2_kit.model.assemble import read_manifest
    from samed2_kit.predict import predict_file

    if is_export_dir(args.weights):  # `samed2 export`'s folder: onnxruntime, same results
        from samed2_kit.deploy.runtime import OnnxModel

        model = OnnxModel(args.weights)
        trained_on = model.manifest.get("modalities", [])
    else:
        model = load_model(args.weights).eval()
        trained_on = read_manifest(Path(args.weights)).get("modalities", [])
    window = tuple(args.window) if args.window else None
    path = predict_file(model, args.input, args.prompts, args.out, args.format, args.modality,
                        window, args.support, progress=True, trained_on=trained_on,
                        overwrite=args.overwrite, series_uid=args.series_uid)  # fmt: skip
    print(f"[samed2] wrote {path}")
    return 0


def cmd_export(args) -> int:
    from samed2_kit.deploy.export import check_opset, export_onnx
    from samed2_kit.model.build import check_image_size

    check_opset(args.opset, "--opset")  # errors that name the options
    if args.image_size is not None:
        check_image_size(args.image_size, "--image-size")
    try:
        out = export_onnx(args.run, args.out, args.image_size, args.opset, args.overwrite,
                          propagation=True, quantize=args.quantize)  # fmt: skip
    except ImportError as e:  # onnx missing: the message names the extra to install
        print(f"samed2 export: error: {e}", file=sys.stderr)
        return 2
    print(f"[samed2] exported {args.run} to {out} (see {out}/manifest.json)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samed2", description="Fine-tune SAM 2 for medical images.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="train + evaluate on the bundled sample data")
    q.add_argument("--checkpoint", help="SAM 2 checkpoint (.pt) to fine-tune from")
    q.add_argument("--out", help="run folder (default: recipe out_dir); replaced unless --resume")
    q.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    q.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train and evaluate from a YAML recipe")
    t.add_argument("recipe")
    t.add_argument("--out", help="run folder (default: recipe out_dir)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run folder with a prompt protocol")
    e.add_argument("weights", help="run folder (model.safetensors + model.json)")
    e.add_argument("data", nargs="?", help="medbank store (default: the recipe's, or RUN-store)")
    e.add_argument("--split", help="store split to evaluate (default: the recipe's eval.split)")
    e.add_argument("--protocol", choices=EVAL_PROTOCOLS, help="prompt protocol (eval.prompt)")
    e.add_argument(
        "--clicks",
        type=int,
        help="corrective clicks for box+clicks and slice-box+clicks (eval.clicks)",
    )
    e.add_argument("--out", help="output folder (default: WEIGHTS/eval-SPLIT-PROTOCOL)")
    e.add_argument("--recipe", help="recipe to evaluate with (default: the saved one)")
    e.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    e.set_defaults(func=cmd_eval)

    from samed2_kit.medbank.cli import add_parser as add_medbank

    add_medbank(sub)

    from samed2_kit.memory.cli import add_parser as add_memory

    add_memory(sub)

    pr = sub.add_parser("predict", help="segment an image or volume from a prompts file")
    pr.add_argument(
        "weights", help="run folder, or an export folder (`samed2 export`: onnxruntime)"
    )
    pr.add_argument("input", help="2D image, NIfTI/NRRD volume or DICOM series folder")
    pr.add_argument("--prompts", help='JSON: {"box": [...]} (2D) or {"slices": {"40": {...}}}')
    pr.add_argument("--out", help="output file or folder (default: the current folder)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace an existing output file (never done otherwise)")  # fmt: skip
    pr.add_argument("--format", default="auto", choices=PREDICT_FORMATS,
                    help="auto: png for 2D, dicom-seg for DICOM, else nifti")  # fmt: skip
    pr.add_argument("--modality", default="auto",
                    help="intensity handling: auto, ct, mr, 2d (auto on a volume: what the "
                    "model trained on, when that is one of ct/mr)")  # fmt: skip
    pr.add_argument("--window", nargs=2, type=float, metavar=("LEVEL", "WIDTH"),
                    help="CT window in HU (default 40 400)")  # fmt: skip
    pr.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "MASK"),
                    help="few-shot support (repeatable; models with a support-reading source)")  # fmt: skip
    pr.add_argument("--series-uid", metavar="UID",
                    help="the SeriesInstanceUID to read from a DICOM folder holding several")  # fmt: skip
    pr.set_defaults(func=cmd_predict)

    from samed2_kit.deploy.contract import DEFAULT_OPSET, FORMATS, OPSETS, QUANTIZE

    x = sub.add_parser("export", help="export a run folder as ONNX graphs (+ manifest.json)")
    x.add_argument("run", help="run folder (model.safetensors + model.json)")
    x.add_argument("--out", required=True, help="export folder (written atomically)")
    x.add_argument("--format", default="onnx", choices=FORMATS, help="the graph format (onnx)")
    x.add_argument("--image-size", type=int, metavar="S",
                   help="input side in px, a multiple of 32 (default: the run's)")  # fmt: skip
    x.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {OPSETS[0]} to {OPSETS[1]} (default {DEFAULT_OPSET})")  # fmt: skip
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (never anything else)")  # fmt: skip
    x.add_argument("--quantize", choices=QUANTIZE,
                   help="int8: the image encoder quantised dynamically (faster on CPU; "
                   "default: fp32, see docs/deploy.md)")  # fmt: skip
    x.set_defaults(func=cmd_export)

    a = sub.add_parser("app", help="the interactive app in the browser (127.0.0.1)")
    a.add_argument("run", nargs="?", default="runs/quickstart",
                   help="run folder or export folder (default: runs/quickstart)")  # fmt: skip
    a.add_argument("--data", metavar="DIR", help="a folder of images/volumes the page lists")
    a.add_argument("--examples", metavar="DIR", default="samed2-annotations",
                   help="where 'save as training example' writes (a medbank source + spec)")  # fmt: skip
    a.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one from 7860)")
    a.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx"),
                   help="auto: onnxruntime when installed (exported once at start), else torch")  # fmt: skip
    a.add_argument("--max-upload-mb", type=int, help="upload size limit (default 512)")
    a.set_defaults(func=cmd_app)

    i = sub.add_parser("info", help="versions and model variants")
    i.set_defaults(func=cmd_info)
    return p


def cmd_app(args) -> int:
    from samed2_kit.app import serve

    if not Path(args.run).is_dir():
        raise FileNotFoundError(f"{args.run} is not a folder: pass a run folder (`samed2 "
                                "quickstart` writes runs/quickstart) or an export folder")  # fmt: skip
    try:
        serve(args.run, data=args.data, examples=args.examples, port=args.port,
              backend=args.backend, block=True, max_upload_mb=args.max_upload_mb)  # fmt: skip
    except ImportError as e:
        raise ValueError(str(e)) from e
    return 0


def _not_key_value(words: list[str]) -> str:
    """The error for overrides lacking `=` (e.g. `train.steps 5`), with the likely fix."""
    import re

    msg = f"override {words[0]!r} is not key=value (e.g. train.steps=100)"
    key = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
    if len(words) > 1 and key.match(words[0]) and not key.match(words[1]):
        msg += f": write {words[0]}={words[1]}"
    return msg


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="[samed2] %(levelname)s %(message)s")
    parser = build_parser()
    # key=value overrides may come after options (`train R.yaml --out D a=1`): argparse leaves them
    args, extra = parser.parse_known_args(argv)
    stray = [
        e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")
    ]
    words = [e for e in stray if not e.startswith("-")]
    if hasattr(args, "overrides") and len(words) == len(stray):  # no unknown --option
        bad = [e for e in [*args.overrides, *words] if "=" not in e]
        if bad:
            print(f"samed2 {args.command}: error: {_not_key_value(bad)}", file=sys.stderr)
            return 2
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"samed2 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically: nothing half-written remains
        print(f"samed2 {args.command}: interrupted; no partial output was left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
