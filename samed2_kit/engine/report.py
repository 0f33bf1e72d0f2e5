"""Run report: a training-curve plot, overlays of the best and worst held-out cases, Markdown."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(history, path: Path) -> None:
    """Loss per step (thin) and its moving average (thick), written to `path` (PNG)."""
    plt = _figure()
    steps = np.array([h.step for h in history])
    loss = np.array([h.loss for h in history])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    ax.plot(steps[k - 1 :], smooth, lw=2, label=f"moving average ({k} steps)")
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_overlays(items, rows, preds, path: Path, n: int = 3) -> None:
    """Best and worst `n` cases by Dice: image, ground truth (green), prediction (red).
    `items`: the `EvalItem`s evaluated (matched to rows by sample_id)."""
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
        ax.contour(preds[i], levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"{row.sample_id}\nDice {row.dice:.3f} (box {row.box_dice:.3f})", fontsize=8)
        ax.axis("off")
    fig.suptitle("held-out cases, best and worst: ground truth green, prediction red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def markdown(summary: dict, info: dict) -> str:
    """The report text: setup, metrics table (model vs box baseline) per task, and the plots."""
    lines = [f"# Run report: {info.get('name', 'run')}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "name"]
    lines += [
        "",
        "## Held-out metrics (prompt protocol: " + info.get("eval_prompt", "box") + ")",
        "",
        "Box baseline = the prompt box filled as the mask. NSD at the stated tolerance; HD95 in mm.",
        "",
        "| task | n | Dice | box Dice | NSD | box NSD | HD95 mm | box HD95 mm |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = {**summary["per_task"], "**all**": summary["overall"]}
    for name, s in groups.items():
        lines.append(
            f"| {name} | {s['n']} | {_fmt(s['dice'])} | {_fmt(s['box_dice'])} | {_fmt(s['nsd'])} | "
            f"{_fmt(s['box_nsd'])} | {_fmt(s['hd95'])} | {_fmt(s['box_hd95'])} |"
        )
    o = summary["overall"]
    lines += [
        "",
        f"Dice gain over the box baseline: {o['dice'] - o['box_dice']:+.3f}",
        "",
        "## Training curve",
        "",
        "![training loss](training_curve.png)",
        "",
        "## Best and worst held-out cases",
        "",
        "![overlays](overlays.png)",
        "",
        "Per-case values: `per_case.csv`; all numbers: `metrics.json`.",
        "",
    ]
    return "\n".join(lines)
