"""Run report: a training-curve plot, overlays of the best and worst evaluated cases, Markdown.

The evaluated split is called "held-out" only when it is not the training split."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def held_out_label(noun: str, splits: tuple[str, str] | None = None) -> str:
    """`noun` named for the split it was measured on: "held-out Dice", or "Dice on split 'train'
    (not held out)" when `splits` (evaluated split, training split) are the same split. None:
    held out."""
    if splits is None or splits[0] != splits[1]:
        return f"held-out {noun}"
    return f"{noun} on split {splits[0]!r} (not held out)"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(log: list[dict], path: Path) -> None:
    """Loss per step (thin) and its moving average (thick) from train_log.jsonl entries
    ({"step", "loss"}), written to `path` (PNG)."""
    plt = _figure()
    entries = [e for e in log if "loss" in e]
    steps = np.array([e["step"] for e in entries])
    loss = np.array([e["loss"] for e in entries])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    ax.plot(steps[k - 1 :], smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_validation(entries: list[dict], path: Path) -> None:
    """Validation Dice per task against the step, from train_log.jsonl's {"step", "val"} entries."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    names = sorted({k for e in entries for k in e["val"]})
    for name in names:
        pts = [(e["step"], e["val"][name]) for e in entries if name in e["val"]]
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=name.removeprefix("dice/"))
    ax.set(xlabel="optimizer step", ylabel="validation Dice", title="Validation Dice per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_overlays(
    items, rows, preds, path: Path, n: int = 3, splits: tuple[str, str] | None = None
) -> None:
    """Best and worst `n` cases by Dice: image, ground truth (green), prediction (red).
    `items`: the `EvalItem`s evaluated (matched to rows by sample_id); `splits`: (evaluated,
    training) split, for the title (`held_out_label`)."""
    from samed2_kit.medbank.preprocess import normalize_intensity

    plt = _figure()
    by_id = {it.sample_id: it for it in items}
    order = np.argsort([r.dice for r in rows])
    best = list(order[::-1][:n])
    picks = best + [i for i in order[:n] if i not in best]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 3.4), dpi=100, squeeze=False)
    for ax, i in zip(axes[0], picks, strict=True):
        row, it = rows[i], by_id[rows[i].sample_id]
        image, gt = it.load()
        ax.imshow(normalize_intensity(image, modality=it.intensity, window=it.window))
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=1.2)
        pred = preds[i][it.key] if preds[i].ndim == 3 else preds[i]  # a volume: its key slice
        ax.contour(pred, levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"{row.sample_id}\nDice {row.dice:.3f} (box {row.box_dice:.3f})", fontsize=8)
        ax.axis("off")
    cases = held_out_label("cases", splits)
    fig.suptitle(f"{cases}, best and worst: ground truth green, prediction red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_click_curve(summary: dict, path: Path) -> None:
    """Mean Dice after the box (click 0) and after each corrective click, one line per task (and
    the overall mean, dashed, for several tasks), from `evaluate.summarize` of a box+clicks run;
    written to `path` as PNG."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    groups = [(t, s, "-") for t, s in summary["per_task"].items()]
    if len(groups) > 1:
        groups.append(("all", summary["overall"], "--"))
    for name, s, style in groups:
        curve = s.get("click_dice") or []
        ax.plot(range(len(curve)), curve, style, marker="o", ms=3, label=f"{name} (n={s['n']})")
    ax.set(xlabel="corrective clicks after the box", ylabel="mean Dice", title="Dice per click")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def metrics_table(groups: dict[str, dict], first: str = "task") -> list[str]:
    """Markdown table lines, one row per group of `evaluate.summarize`; with Dice AUC and the
    final Dice for box+clicks groups (those with a `click_dice` curve)."""
    clicks = any("click_dice" in s for s in groups.values())
    units = {s.get("unit", "mm") for s in groups.values()}
    unit = units.pop() if len(units) == 1 else None  # else each cell names its unit
    head = f"| {first} | n | " + ("Dice AUC | final Dice" if clicks else "Dice")
    hd = f"HD95 {unit}" if unit else "HD95"
    head += f" | box Dice | gain [95% CI, by case] | NSD | box NSD | {hd} | box {hd} |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, s in groups.items():
        auc = f"{_fmt(s.get('dice_auc', float('nan')))} | " if clicks else ""
        u = "" if unit else f" {s.get('unit', 'mm')}"
        lines.append(
            f"| {name} | {s['n']} | {auc}{_fmt(s['dice'])} | {_fmt(s['box_dice'])} | "
            f"{gain_text(s)} | {_fmt(s['nsd'])} | {_fmt(s['box_nsd'])} | {_fmt(s['hd95'])}{u} | "
            f"{_fmt(s['box_hd95'])}{u} |"
        )
    return lines


def gain_text(s: dict) -> str:
    """`+0.048 [-0.010, +0.101]`: the mean Dice gain over the baseline and its paired bootstrap
    95% interval over cases (`evaluate.gain_interval`)."""
    lo, hi = s.get("gain_ci95", [float("nan")] * 2)
    gain = s["dice"] - s["box_dice"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{gain:+.3f}"
    return f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}]"


PROTOCOL_TEXT = {
    "box": "box: the tight ground-truth box",
    "point": "point: one positive click at the mask pixel farthest from its border",
    "box+clicks": "box+clicks: the tight box, then up to {k} corrective clicks, each at the "
    "centre of the largest error region; Dice AUC = area under Dice vs click 0..{k}, "
    "divided by {k}",
    "slice-box": "slice-box (3D, per volume): the tight box on the key slice (largest area), "
    "propagated both ways through the volume",
    "slice-box+clicks": "slice-box+clicks (3D, per volume): slice-box, then up to {k} corrective "
    "clicks at the centre of the largest 3D error region, each re-propagated from its slice; "
    "Dice AUC = area under 3D Dice vs click 0..{k}, divided by {k}",
    "box-per-slice": "box-per-slice (3D, per volume): each slice with the object prompted with "
    "its own tight box, no propagation",
}


def protocol_text(protocol: str, clicks: int | None = None) -> str:
    """One line describing the prompt protocol (K corrective clicks for box+clicks)."""
    return PROTOCOL_TEXT.get(protocol, protocol).format(k="K" if clicks is None else clicks)


def baseline_text(protocol: str, summary: dict) -> str:
    """What the baseline columns are, and the units of the distances."""
    from samed2_kit.engine.volumes import VOLUME_PROTOCOLS

    if protocol in VOLUME_PROTOCOLS:
        base = "Box baseline = the key slice's box extruded over the slices holding the object."
    else:
        base = "Box baseline = the prompt box filled as the mask."
    unit = summary["overall"].get("unit", "mm")
    units = {"mm": "in mm", "px": "in pixels (the data gave no pixel size)"}
    where = units.get(unit, "in mm, or in pixels for data without a pixel size (see `unit`)")
    return f"{base} NSD at the stated tolerance, HD95: {where}."


def nsd_tolerance_text(text: str, unit: str) -> str:
    """The NSD tolerance line in the data's unit: `text` as configured ("2.0 mm, ct: 1.0 mm"),
    `unit` the summary's ("mm", "px", or "mm+px" when only some cases have a pixel size)."""
    if unit == "px":
        return text.replace(" mm", " px") + " (the data gave no pixel size: in pixels)"
    if "px" in unit:
        return text + " (in pixels for the cases without a pixel size)"
    return text


def _setup_lines(info: dict, summary: dict) -> list[str]:
    unit = summary["overall"].get("unit", "mm")
    lines = []
    for k, v in info.items():
        if k == "nsd_tolerance_mm":
            k, v = "nsd_tolerance", nsd_tolerance_text(f"{v} mm", unit)
        if k != "name":
            lines.append(f"- {k}: {v}")
    return lines


def markdown(
    summary: dict,
    info: dict,
    click_curve: str | None = None,
    validation: list | None = None,
    splits: tuple[str, str] | None = None,
) -> str:
    """The run report text: setup, metrics table (model vs box baseline) per task, the plots.
    `info` keys are listed as set-up lines (`eval_prompt`, `eval_clicks` name the protocol);
    `click_curve`: file name of `plot_click_curve`'s PNG, shown when given; `validation`: the
    log's validation entries (the last one is tabulated, val_dice.png is shown); `splits`:
    (evaluated, training) split: the headings say "held-out" only when they differ."""
    protocol = info.get("eval_prompt", "box")
    lines = [f"# Run report: {info.get('name', 'run')}", ""]
    lines += _setup_lines(info, summary)
    lines += [
        "",
        f"## {_capital(held_out_label('metrics', splits))} (prompt protocol: {protocol})",
        "",
        f"Protocol {protocol_text(protocol, info.get('eval_clicks'))}.",
        baseline_text(protocol, summary),
        "",
    ]
    lines += metrics_table({**summary["per_task"], "**all**": summary["overall"]})
    o = summary["overall"]
    lines += ["", f"Dice gain over the box baseline: {o['dice'] - o['box_dice']:+.3f}", ""]
    if click_curve:
        lines += ["## Dice per corrective click", "", f"![Dice per click]({click_curve})", ""]
    lines += ["## Training curve", "", "![training loss](training_curve.png)", ""]
    if validation:
        last = validation[-1]
        lines += [f"## Validation during training (last: step {last['step']})", "",
                  "| task | Dice |", "| --- | --- |"]  # fmt: skip
        lines += [f"| {k.removeprefix('dice/')} | {_fmt(v)} |" for k, v in last["val"].items()]
        lines += ["", "![validation Dice](val_dice.png)", ""]
    lines += [
        f"## Best and worst {held_out_label('cases', splits)}",
        "",
        "![overlays](overlays.png)",
        "",
        "Per-case values: `per_case.csv`; all numbers: `metrics.json`.",
        "",
    ]
    return "\n".join(lines)


def eval_markdown(summary: dict, info: dict, click_curve: str | None = None) -> str:
    """`samed2 eval`'s summary: set-up lines from `info` (`protocol`, `clicks` among them), tables
    per task and per modality, the click curve when given."""
    protocol = info.get("protocol", "box")
    lines = [f"# Evaluation: {info.get('name', 'model')}", ""]
    lines += _setup_lines(info, summary)
    lines += [
        "",
        f"Protocol {protocol_text(protocol, info.get('clicks'))}. "
        + baseline_text(protocol, summary).replace(
            "stated tolerance", "tolerance of each modality"
        ),
        "",
        "## Per task",
        "",
    ]
    lines += metrics_table({**summary["per_task"], "**all**": summary["overall"]})
    lines += ["", "## Per modality", ""]
    lines += metrics_table(summary["per_modality"], first="modality")
    if click_curve:
        lines += ["", "## Dice per corrective click", "", f"![Dice per click]({click_curve})"]
    lines += ["", "Per-case values: `per_case.csv`; all numbers: `summary.json`.", ""]
    return "\n".join(lines)


def write_eval(out_dir: Path, rows: list, summary: dict, info: dict) -> list[Path]:
    """`samed2 eval`'s folder: per_case.csv, summary.json ({"info", "overall", "per_task",
    "per_modality"}), summary.md and, for box+clicks, click_curve.png; each file atomically.
    Returns the files written."""
    import json

    from samed2_kit.engine.evaluate import write_csv
    from samed2_kit.utils.atomic import atomic_path, write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "per_case.csv", out_dir / "summary.json", out_dir / "summary.md"]
    write_csv(rows, written[0])
    write_text(written[1], json.dumps({"info": info, **summary}, indent=2, default=str) + "\n")
    curve = "click_curve.png" if "click_dice" in summary["overall"] else None
    write_text(written[2], eval_markdown(summary, info, curve))
    if curve:
        with atomic_path(out_dir / curve) as tmp:
            plot_click_curve(summary, tmp)
        written.append(out_dir / curve)
    return written


def continual_markdown(result: dict, recipe, store: str) -> str:
    """The continual run's report: stages, the Dice matrix, forgetting and gain per stage."""
    stages = recipe.continual.stages
    names = [st.name for st in stages]
    dice = _capital(held_out_label("Dice", (recipe.eval.split, recipe.data.train_split)))
    lines = ["# Continual training report", "",
             f"- model: {recipe.model.variant} at {recipe.model.image_size} px; store {store}",
             f"- evaluation: {protocol_text(recipe.eval.prompt, recipe.eval.clicks)}, split "
             f"{recipe.eval.split}", ""]  # fmt: skip
    for i, st in enumerate(stages):
        replay = st.replay if recipe.continual.replay is None else recipe.continual.replay
        lines.append(f"- stage {i + 1} `{st.name}`: tasks {', '.join(st.tasks)}; {st.steps} "
                     f"steps; replays {replay} earlier examples")  # fmt: skip
    lines += ["", f"## {dice} after each stage (rows) on each stage's tasks (columns)", "",
              "| after | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]  # fmt: skip
    for row in result["matrix"]:
        lines.append(
            f"| {row['after']} | " + " | ".join(_fmt(row["dice"][n]) for n in names) + " |"
        )
    lines += ["", "## Forgetting and gain", "",
              "Gain = Dice after the stage - Dice before it; forgetting = Dice after the stage - "
              "Dice after the last stage (positive: lost).", "",
              "| stage | before | after own stage | at the end | gain | forgetting |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, f in result["forgetting"].items():
        lines.append(
            f"| {name} | {_fmt(f['dice_before'])} | {_fmt(f['dice_after_own_stage'])} | "
            f"{_fmt(f['dice_at_end'])} | {f['gain']:+.3f} | {f['forgetting']:+.3f} |"
        )
    lines += ["", "Per-stage training logs, validation and checkpoints: `stage-*/`.", ""]
    return "\n".join(lines)
