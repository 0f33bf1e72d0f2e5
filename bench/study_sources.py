"""Study: the prompt sources on the real 2D sets in ../shared/data (skips when absent).

test-tiny from random init at 256 px (CPU budget), the same seed, data order and steps in every
arm; held-out test Dice per task. Tasks: fetal head (HC18, ultrasound), polyp (Kvasir-SEG,
endoscopy), breast lesion (BUSI, ultrasound).

1. Few-shot. Three models trained on fetal head + polyp:
   - episodic: 1-way 1-shot episodes, no manual prompt, the hard_prototypes source (CoW);
   - box: plain SAM 2 fine-tuning with box prompts;
   - unprompted: plain, trained and evaluated without any prompt (semantic segmentation).
   Evaluated on the test split of the seen tasks and of breast lesion, a task none of them
   trained on. Few-shot supports: the first training case of the task. Rows: the episodic model
   prompted by the support only (SAM 2's mask), its prototype map alone (the source's own logits
   > 0), support + box; the box model with boxes; the unprompted model without prompt.
2. Fine-tuning with and without each source on the same budget, box prompts, all three tasks:
   plain / + similarity prior / + hard prototypes (episodes; evaluated with box + support) / both.

    .venv/bin/python bench/study_sources.py [--steps 800] [--out /tmp/study-sources]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from _sets import study_overrides, study_setup

SEEN, UNSEEN = ["fetal_head", "polyp"], "breast_lesion"
TASKS = [*SEEN, UNSEEN]
GATES = 'train.lr_mult={"^source_gates\\\\.": 20}'  # as the recipes: gates must travel O(1)
HARD = ["sources.hard_prototypes={}", "data.episodes=true", "loss.boundary=0.5", GATES]
PRIOR = ["sources.similarity_prior={slots: 32, dim: 64, warmup_updates: 50}", GATES]


def train_arm(args, base: list[str], name: str, tasks: list[str], extra: list[str]):
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe
    from samed2_kit.model.assemble import load as load_model

    recipe = load_recipe(None, [*base, f"data.tasks=[{', '.join(tasks)}]", *extra])
    run_recipe(recipe, args.out / name, progress=False, overwrite=True)
    return load_model(args.out / name).eval()


def protocol_dice(model, store: str, tasks: list[str], prompt: str, supports: bool) -> dict:
    """Test Dice per task through `evaluate` (supports: the first training case per task)."""
    from samed2_kit.config import EvalConfig
    from samed2_kit.engine import evaluate as ev
    from samed2_kit.engine.items import items_from_store, supports_from_store

    items = items_from_store(store, "test", tasks)
    sup = supports_from_store(store, "train", tasks, 1) if supports else None
    rows, _ = ev.evaluate(model, items, EvalConfig(prompt=prompt), False, supports=sup)
    return {t: s["dice"] for t, s in ev.summarize(rows)["per_task"].items()}


@torch.no_grad()
def direct_dice(model, store: str, tasks: list[str], what: str) -> dict:
    """Test Dice per task without any prompt: SAM 2's mask (`what="unprompted"`) or, with the
    task's support, the hard-prototype map alone (`what="prototype_map"`)."""
    import torch.nn.functional as F

    from samed2_kit.engine.evaluate import dice
    from samed2_kit.engine.items import items_from_store, supports_from_store
    from samed2_kit.model import Prompts
    from samed2_kit.model.predictor import Predictor

    pred = Predictor(model)
    sup = supports_from_store(store, "train", tasks, 1)
    out: dict[str, list[float]] = {}
    for item in items_from_store(store, "test", tasks):
        image, gt = item.load()
        if what == "prototype_map":
            s_img, s_mask = sup[item.task][0].load()
            pred.set_support(s_img, s_mask)
        pred.set_image(image)
        res = model.decode(pred._features, Prompts(), support=pred._support)
        logits = (
            res.low_res_logits if what == "unprompted" else res.source_logits["hard_prototypes"]
        )
        full = F.interpolate(logits[:, :1].float(), size=gt.shape, mode="bilinear")
        out.setdefault(item.task, []).append(dice(full[0, 0].numpy() > 0, gt))
    return {t: float(np.mean(v)) for t, v in out.items()}


def few_shot(args, base: list[str], store: str) -> dict:
    rows = {}
    ep = train_arm(args, base, "episodic", SEEN,
                   [*HARD, "data.prompt.mode=none", "eval.prompt=support"])  # fmt: skip
    rows["episodic: support only"] = protocol_dice(ep, store, TASKS, "support", True)
    rows["episodic: prototype map alone"] = direct_dice(ep, store, TASKS, "prototype_map")
    rows["episodic: support + box"] = protocol_dice(ep, store, TASKS, "box", True)
    box = train_arm(args, base, "box", SEEN, [])
    rows["box-trained: box"] = protocol_dice(box, store, TASKS, "box", False)
    rows["box-trained: no prompt"] = direct_dice(box, store, TASKS, "unprompted")
    unp = train_arm(args, base, "unprompted", SEEN, ["data.prompt.mode=none", "train.val_every=0"])
    rows["unprompted-trained: no prompt"] = direct_dice(unp, store, TASKS, "unprompted")
    return rows


def fine_tune(args, base: list[str], store: str) -> dict:
    arms = {"plain": [], "+ similarity prior": PRIOR, "+ hard prototypes": HARD,
            "+ both": [*PRIOR, *HARD]}  # fmt: skip
    rows = {}
    for name, extra in arms.items():
        slug = "ft-" + name.strip("+ ").replace(" ", "-")
        model = train_arm(args, base, slug, TASKS, extra)
        rows[name] = protocol_dice(model, store, TASKS, "box", "hard_prototypes" in "".join(extra))
        rows[name]["gates"] = {
            k: round(float(g.detach()), 3) for k, g in model.source_gates.items()
        }
    return rows


def table(title: str, rows: dict) -> None:
    print(f"\n{title}\n")
    print("| arm | fetal head | polyp | breast lesion (unseen in part 1) | mean |")
    print("| --- | --- | --- | --- | --- |")
    for arm, r in rows.items():
        vals = [r.get(t, float("nan")) for t in TASKS]
        extra = f" (gates {r['gates']})" if r.get("gates") else ""
        print(f"| {arm}{extra} | " + " | ".join(f"{v:.3f}" for v in vals)
              + f" | {np.nanmean(vals):.3f} |")  # fmt: skip


def main() -> None:
    setup = study_setup(__doc__, "study-sources", ["few-shot", "fine-tune"], (0.6, 0.1, 0.3))
    if setup is None:
        return
    args, spec = setup
    torch.set_num_threads(2)
    store = str(args.out / "store")
    base = [*study_overrides(spec, Path(store)), f"train.steps={args.steps}"]
    results = {}
    if args.only != "fine-tune":
        results["few_shot"] = few_shot(args, base, store)
        table(f"Few-shot, trained on fetal head + polyp, {args.steps} steps, test Dice",
              results["few_shot"])  # fmt: skip
    if args.only != "few-shot":
        results["fine_tune"] = fine_tune(args, base, store)
        table(f"Fine-tuning on all three tasks, {args.steps} steps, box prompts, test Dice",
              results["fine_tune"])  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
