"""Study: the confidence memory on the real 2D sets in ../shared/data (skips when absent).

Same init (seed), same data order, same steps in every arm; test-tiny from random init at 256 px
(CPU budget); held-out Dice with box prompts.

1. Joint training on two ultrasound tasks (fetal head, HC18; breast lesions, BUSI): without
   memory / with memory (k=4, threshold 0.5, partition per task).
2. Continual: stage 1 fetal head (ultrasound), stage 2 polyps (endoscopy, Kvasir-SEG): no memory
   and no replay / memory (the stage-1 partition survives stage 2 and is retrieved at test time) /
   16 replayed stage-1 examples without memory (the reference). Forgetting = Dice on stage 1's
   test cases after stage 1 minus after stage 2.

From random init a 1.3 M-parameter model reaches confident predictions (the memory's writes) only
on the easier tasks within a CPU budget (500 steps on BUSI + Kvasir: Dice 0.23, no entry ever
reached confidence 0.6): hence fetal head in both parts.

    .venv/bin/python bench/study_memory.py [--steps 500] [--out /tmp/study-memory]
"""

from __future__ import annotations

import json
from pathlib import Path

from _sets import study_overrides, study_setup

MEMORY = "memory={threshold: 0.5, capacity: 64, top_k: 4, partition_by: task}"


def joint(args, common: list[str], memory: bool) -> dict:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe

    over = [*common, f"train.steps={args.steps}", "data.tasks=[fetal_head, breast_lesion]"]
    name = "joint-memory" if memory else "joint-plain"
    recipe = load_recipe(None, over + ([MEMORY] if memory else []))
    summary = run_recipe(recipe, args.out / name, progress=False, overwrite=True)
    out = {t: s["dice"] for t, s in summary["per_task"].items()}
    return out | {"all": summary["overall"]["dice"], "entries": entries(args.out / name)}


def entries(run: Path) -> str:
    """Entries per partition of the bank a run saved ("-" without memory)."""
    from samed2_kit.memory import MEMORY_FILE, ConfidenceMemory

    if not (run / MEMORY_FILE).is_file():
        return "-"
    bank = ConfidenceMemory.load(run / MEMORY_FILE)
    return ", ".join(f"{r['partition']} {r['entries']}" for r in bank.table()) or "0"


def continual(args, common: list[str], arm: str) -> dict:
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.continual import run_continual

    replay = 16 if arm == "replay" else 0
    stages = (f"continual={{stages: [{{name: us, tasks: [fetal_head], steps: {args.steps}}}, "
              f"{{name: endo, tasks: [polyp], steps: {args.steps}, replay: {replay}}}]}}")  # fmt: skip
    recipe = load_recipe(None, [*common, stages] + ([MEMORY] if arm == "memory" else []))
    result = run_continual(recipe, args.out / f"continual-{arm}", progress=False, overwrite=True)
    return result["forgetting"] | {"entries": entries(args.out / f"continual-{arm}")}


def main() -> None:
    setup = study_setup(__doc__, "study-memory", ["joint", "continual"], (0.7, 0.15, 0.15))
    if setup is None:
        return
    args, spec = setup
    common = study_overrides(spec, args.out / "store")
    results = {}
    if args.only != "continual":
        results["joint"] = {
            arm: joint(args, common, arm == "memory") for arm in ("plain", "memory")
        }
        print(f"\nJoint training, {args.steps} steps x batch 4, test Dice (box prompts)\n")
        print(
            "| arm | fetal_head | breast_lesion | all | bank entries |\n| --- | --- | --- | --- | --- |"
        )
        for arm, r in results["joint"].items():
            print(f"| {arm} | {r['fetal_head']:.3f} | {r['breast_lesion']:.3f} | {r['all']:.3f} | "
                  f"{r['entries']} |")  # fmt: skip
    if args.only != "joint":
        results["continual"] = {
            a: continual(args, common, a) for a in ("plain", "memory", "replay")
        }
        print(f"\nContinual: ultrasound then endoscopy, {args.steps} steps each, test Dice\n")
        print("| arm | US after stage 1 | US at the end | forgetting | endo gain | bank entries |")
        print("| --- | --- | --- | --- | --- | --- |")
        for arm, f in results["continual"].items():
            us, endo = f["us"], f["endo"]
            print(f"| {arm} | {us['dice_after_own_stage']:.3f} | {us['dice_at_end']:.3f} | "
                  f"{us['forgetting']:+.3f} | {endo['gain']:+.3f} | {f['entries']} |")  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
