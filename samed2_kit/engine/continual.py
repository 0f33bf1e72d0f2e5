"""Continual training: stages (modality A, then B, ...) trained one after the other on one model.

After every stage each stage's tasks are evaluated on the held-out split, giving the matrix
Dice[after stage i][tasks of stage j]; the report states

- forgetting on stage j = Dice after stage j - Dice after the last stage (on stage j's tasks),
- gain on stage j = Dice after stage j - Dice before it (what the stage's training bought).

A stage may replay `replay` stored training examples of the earlier stages' tasks (chosen with the
recipe's seed, fixed for the stage), mixed into its own data; and it may train its own LoRA set
(`adapter: NAME`, with the recipe's `adapters.lora` spec) with everything else frozen (plus the
stage's `trainable` groups): its tasks are then evaluated with that set active, so the weights
earlier stages use are not touched.

    out_dir/
      run.json, report.md, continual.json (matrix, forgetting, gain), per_case.csv (last stage)
      stage-1-<name>/   checkpoints/, train_log.jsonl, tensorboard/, weights.safetensors (the
                        whole model after the stage), memory.safetensors (the bank then, with
                        memory), eval.json (the matrix row and the sha256 of those files,
                        checked on --resume; written last)
      model.safetensors, model.json     the final model
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from samed2_kit.config import Recipe, StageConfig, to_dict
from samed2_kit.engine.data import DatasetView

STAGE_WEIGHTS = "weights.safetensors"
STAGE_EVAL = "eval.json"


class Replay(DatasetView):
    """A fixed subset of a dataset with `set_epoch` (the examples a later stage replays)."""

    def __init__(self, base, indices: np.ndarray) -> None:
        super().__init__(base)
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.base[self.indices[i]]


def adapter_pattern(name: str) -> str:
    """Regex over parameter names selecting one LoRA/LoHa/LoKr set (e.g. `...qkv.lora_A.ct.weight`)."""
    import re

    from samed2_kit.adapters.lora import PEFT_PARAM_PATTERN

    return rf"(?:{PEFT_PARAM_PATTERN})\w*\.{re.escape(name)}(?:\.|$)"


def use_stage_adapter(model, recipe: Recipe, stage: StageConfig) -> None:
    """Add (first time) and activate the stage's LoRA set; no-op for a stage without one."""
    from samed2_kit.adapters.lora import inject_lora, lora_sets, set_active_lora

    if stage.adapter is None:
        return
    if "lora" not in recipe.adapters:
        raise ValueError(
            f"continual stage {stage.name!r} names adapter {stage.adapter!r} but the recipe has "
            "no adapters.lora: add e.g. `adapters: {lora: {preset: encoder-attn, rank: 8}}`"
        )
    if stage.adapter not in lora_sets(model):
        inject_lora(model, recipe.adapters["lora"], adapter_name=stage.adapter)
    set_active_lora(model, stage.adapter)


def stage_recipe(recipe: Recipe, stage: StageConfig) -> Recipe:
    """The recipe one stage trains with: its tasks, steps, learning rate and what trains."""
    trainable = stage.trainable or recipe.train.trainable
    if stage.adapter:
        trainable = [adapter_pattern(stage.adapter), *(stage.trainable or [])]
    train = dataclasses.replace(
        recipe.train, steps=stage.steps, lr=stage.lr or recipe.train.lr, trainable=trainable
    )
    data = dataclasses.replace(recipe.data, tasks=list(stage.tasks))
    return dataclasses.replace(recipe, train=train, data=data, continual=None)


def stage_data(recipe: Recipe, store: str, index: int) -> list:
    """Stage `index`'s training data: its tasks, plus `replay` examples of earlier stages' tasks."""
    from samed2_kit.engine.data import store_dataset

    stages = recipe.continual.stages
    stage, seed = stages[index], recipe.train.seed
    replay = stage.replay if recipe.continual.replay is None else recipe.continual.replay
    parts = [store_dataset(recipe, store, stage.tasks, seed)]
    earlier = [t for s in stages[:index] for t in s.tasks if t not in stage.tasks]
    if replay and earlier:
        old = store_dataset(recipe, store, sorted(set(earlier)), seed)
        rng = np.random.default_rng([seed, index, 11])
        keep = rng.choice(len(old), size=min(replay, len(old)), replace=False)
        parts.append(Replay(old, np.sort(keep)))
    return parts


def stage_dir(out_dir: Path, index: int, stage: StageConfig) -> Path:
    return out_dir / f"stage-{index + 1}-{stage.name}"


def evaluate_stages(model, recipe: Recipe, items_by_stage: dict[str, list]) -> dict:
    """{stage name: summary of `evaluate` on that stage's held-out items}, each stage's tasks with
    its own adapter set when it has one and the set exists yet (the active set is restored)."""
    from samed2_kit.adapters.lora import active_lora, lora_sets, set_active_lora
    from samed2_kit.engine import evaluate as ev

    stages = {s.name: s for s in recipe.continual.stages}
    active, out = active_lora(model), {}
    for name, items in items_by_stage.items():
        if stages[name].adapter in lora_sets(model):
            set_active_lora(model, stages[name].adapter)
        rows, _ = ev.evaluate(model, items, recipe.eval, progress=False)
        if active is not None:
            set_active_lora(model, active)
        out[name] = ev.summarize(rows)
    return out


def forgetting_table(matrix: list[dict], names: list[str]) -> dict:
    """From the rows {"after": stage, "dice": {stage: Dice}} (the first row: before training),
    forgetting and gain per stage (see the module docstring)."""
    dice = {row["after"]: row["dice"] for row in matrix}
    last = matrix[-1]["after"]
    order = [row["after"] for row in matrix]
    out = {}
    for name in names:
        before = order[order.index(name) - 1]
        out[name] = {
            "dice_before": dice[before][name],
            "dice_after_own_stage": dice[name][name],
            "dice_at_end": dice[last][name],
            "gain": dice[name][name] - dice[before][name],
            "forgetting": dice[name][name] - dice[last][name],
        }
    return out


def run_continual(
    recipe: Recipe,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train the recipe's `continual.stages` in order, evaluating every stage's tasks after each;
    returns {"matrix", "forgetting"} ({} on other ranks). `resume` skips finished stages and
    continues the interrupted one from its newest checkpoint."""
    from safetensors.torch import save_file

    from samed2_kit.engine.items import items_from_store
    from samed2_kit.engine.run import check_tasks, start_run, validation
    from samed2_kit.engine.state import checkpoint_dirs
    from samed2_kit.engine.train import train
    from samed2_kit.model import assemble
    from samed2_kit.utils.atomic import atomic_path, sha256_file, write_text

    stages = recipe.continual.stages
    names = [s.name for s in stages]
    if len(set(names)) != len(names) or len(stages) < 2:
        raise ValueError(f"continual.stages {names}: give at least 2 stages with distinct names")
    out_dir = Path(out_dir or recipe.out_dir)
    all_tasks = sorted({t for s in stages for t in s.tasks})  # the similarity prior's classes

    def check(store: str) -> dict:  # before the run folder is created: tasks and split exist
        check_tasks(recipe, store, all_tasks, "continual.stages[].tasks")
        return {s.name: items_from_store(store, recipe.eval.split, s.tasks) for s in stages}

    state, store, items = start_run(recipe, out_dir, resume, overwrite, check)
    main = state.is_main_process

    # with per-stage adapters each stage adds its own LoRA set; one memory bank across stages
    skip = ("lora",) if any(s.adapter for s in stages) else ()  # stages add their own LoRA sets
    model = assemble.from_recipe(recipe, all_tasks, skip_adapters=skip)
    matrix = [{"after": "start", **_row(evaluate_stages(model, recipe, items))}]
    accel = None
    for i, stage in enumerate(stages):
        folder = stage_dir(out_dir, i, stage)
        use_stage_adapter(model, recipe, stage)
        if resume and (folder / STAGE_WEIGHTS).is_file() and (folder / STAGE_EVAL).is_file():
            matrix.append(load_stage(model, folder))
            continue
        sr = stage_recipe(recipe, stage)
        model, result, accel = train(
            sr, model, stage_data(recipe, store, i), folder,
            resume=resume and bool(checkpoint_dirs(folder)),
            validate=validation(sr, store, stage.tasks), progress=progress,
        )  # fmt: skip
        row = {"after": stage.name, **_row(evaluate_stages(model, recipe, items))}
        matrix.append(row)
        if main:
            with atomic_path(folder / STAGE_WEIGHTS) as tmp:
                state_dict = {
                    k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                }
                save_file(state_dict, str(tmp))
            written = [STAGE_WEIGHTS, *assemble.save_state(model, folder)]
            files = {n: sha256_file(folder / n) for n in written}  # checked on --resume
            write_text(folder / STAGE_EVAL, json.dumps({**row, "files": files}, indent=2))  # last
        state.wait_for_everyone()
    result = {"matrix": matrix, "forgetting": forgetting_table(matrix, names)}
    if main:
        write_final(out_dir, model, recipe, result, store)
    state.wait_for_everyone()
    if accel is not None:
        accel.end_training()
    if main:
        for name, f in result["forgetting"].items():
            print(f"[samed2] stage {name}: gain {f['gain']:+.3f}, forgetting {f['forgetting']:+.3f} "
                  f"(Dice {f['dice_after_own_stage']:.3f} after it, {f['dice_at_end']:.3f} at the end)")  # fmt: skip
        print(f"[samed2] run folder: {out_dir}  (report: {out_dir / 'report.md'})")
    return result if main else {}


def load_stage(model, folder: Path) -> dict:
    """A finished stage on --resume: its files checked against the sha256s its eval.json records,
    the model's weights and memory bank as the stage left them; returns its matrix row."""
    from samed2_kit.model import assemble
    from samed2_kit.model.build import read_safetensors
    from samed2_kit.utils.atomic import sha256_file

    fix = f"delete {folder} to train that stage again (with --resume)"
    try:
        row = json.loads((folder / STAGE_EVAL).read_text())
        files = row.pop("files", None) or {}  # stages written before digests: none
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{folder / STAGE_EVAL} is unreadable or not a stage's JSON ({e}): "
                         f"{fix}") from e  # fmt: skip
    for name, digest in files.items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            raise ValueError(f"stage file {folder / name} is missing or damaged (sha256 differs "
                             f"from {STAGE_EVAL}): {fix}")  # fmt: skip
    weights, _ = read_safetensors(folder / STAGE_WEIGHTS, fix, "stage weights ")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"stage weights {folder / STAGE_WEIGHTS} do not fit this model "
                         f"({str(e).splitlines()[0]}): resume with the run's recipe, or {fix}") from e  # fmt: skip
    assemble.load_state(model, folder)  # the memory bank as that stage left it
    return row


def _row(summaries: dict) -> dict:
    return {
        "dice": {k: s["overall"]["dice"] for k, s in summaries.items()},
        "per_task": {k: {t: v["dice"] for t, v in s["per_task"].items()} for k, s in summaries.items()},
    }  # fmt: skip


def write_final(out_dir: Path, model, recipe: Recipe, result: dict, store: str) -> None:
    """The final model, continual.json and report.md (main process)."""
    from samed2_kit.engine import report
    from samed2_kit.model import assemble
    from samed2_kit.utils.atomic import write_text

    assemble.save(model, out_dir, {"recipe": to_dict(recipe)})
    write_text(out_dir / "continual.json", json.dumps(result, indent=2))
    write_text(out_dir / "report.md", report.continual_markdown(result, recipe, store))
