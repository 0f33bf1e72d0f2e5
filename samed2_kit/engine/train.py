"""The training loop on Hugging Face Accelerate (one CPU, one GPU or many: the same code).

AdamW, cosine schedule with linear warm-up, bf16 autocast where the device has it, gradient
accumulation and clipping, a seeded data order defined on global batches (`engine.data`), a
progress bar (loss, samples/s, ETA), TensorBoard through Accelerate's tracker, a JSON-lines step
log, validation every N steps, and checkpoints every N steps from which `resume=True` continues
exactly (`engine.state`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from samed2_kit.config import Recipe, to_dict


@dataclass
class StepLog:
    step: int
    loss: float  # mean over the global batch (all processes, all accumulated micro-batches)
    parts: dict[str, float]  # loss terms of this process's last micro-batch
    lr: float
    samples_per_s: float


@dataclass
class TrainResult:
    history: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    mixed_precision: str = "no"
    train_samples: int = 0
    steps_run: int = 0  # optimizer steps this call ran (fewer than train.steps after a resume)
    log: list[dict] = field(default_factory=list)  # train_log.jsonl entries, incl. validation


def apply_train_mode(model, mode: str) -> int:
    """Freeze by a recipe's `train.mode` (full | decoder; adapters, prompt sources and memory the
    model has stay trainable); return the trainable parameter count."""
    from samed2_kit.adapters.freeze import apply_policy, policy_for_mode

    apply_policy(model, policy_for_mode(model, mode))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inject_adapters(model, recipe: Recipe) -> None:
    """Temporal adapters and LoRA as the recipe says (before training or loading adapters)."""
    a = recipe.adapters
    if a.temporal is not None:
        from samed2_kit.adapters.temporal import inject_temporal_adapters

        inject_temporal_adapters(model, a.temporal)
    if a.lora is not None:
        from samed2_kit.adapters.lora import inject_lora

        inject_lora(model, a.lora)


def param_groups(model, cfg) -> tuple[list[dict], int]:
    """Optimizer groups (LR = train.lr x multiplier) and the trainable-parameter count, from the
    recipe's `train.trainable` policy, else from `train.mode`."""
    from samed2_kit.adapters.freeze import FreezePolicy, apply_policy, policy_for_mode

    if cfg.trainable:
        policy = FreezePolicy(cfg.trainable, dict(cfg.lr_mult))
    else:
        policy = policy_for_mode(model, cfg.mode, dict(cfg.lr_mult))
    groups = apply_policy(model, policy)
    out = [{"params": g["params"], "lr": cfg.lr * g["lr_mult"], "name": g["name"]} for g in groups]
    return out, sum(p.numel() for g in out for p in g["params"])


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> 'bf16' on a CUDA device with bf16 or a CPU with native bf16, else 'no'."""
    if choice in ("no", "bf16", "fp16"):
        return choice
    if choice != "auto":
        raise ValueError(f"train.mixed_precision={choice!r}: use auto, bf16, fp16 or no")
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """LambdaLR: linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_prompts(batch: dict, mode: str):
    """Prompts for a collated batch, following the prompt mode the dataset sampled."""
    from samed2_kit.model.wrapper import Prompts

    boxes = batch["box"] if "box" in mode else None
    points = labels = None
    if "point" in mode:
        points, labels = batch["points"], batch["point_labels"]
    return Prompts(points=points, point_labels=labels, boxes=boxes)


# recipe keys a resumed run may change: they alter neither the weights so far nor the data order
RESUMABLE_CHANGES = {
    "train": ("steps", "save_every", "keep_last", "log_every", "val_every", "tensorboard"),
    "data": ("num_workers", "spec", "store"),
}
LOG = "train_log.jsonl"


def resume_key(recipe: Recipe) -> dict:
    """The parts of a recipe a checkpoint is bound to (eval and `RESUMABLE_CHANGES` left out)."""
    d = to_dict(recipe)
    d.pop("eval", None)
    d.pop("out_dir", None)
    for section, keys in RESUMABLE_CHANGES.items():
        for k in keys:
            d[section].pop(k, None)
    return d


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [x for k in sorted(set(a) | set(b))
                for x in _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]  # fmt: skip
    return [] if a == b else [f"{prefix}: {b!r} in the checkpoint, {a!r} now"]


def check_resume(meta: dict, want: dict, folder) -> None:
    """A clear error when a checkpoint was written by another recipe, model or launch."""
    problems = _diff(want["recipe"], meta.get("recipe", {}))
    for key, what in (("frozen_sha256", "the frozen (not trained) weights"),
                      ("world", "the number of processes"), ("samples", "the training data")):  # fmt: skip
        if meta.get(key) != want[key]:
            problems.append(f"{what}: {meta.get(key)!r} in the checkpoint, {want[key]!r} now")
    if problems:
        raise ValueError(
            f"cannot resume from {folder}: it was written by a different run. "
            + "; ".join(problems[:6])
            + ". Resume with the run's recipe and launch, or start a new run (another --out)"
        )


class StepLogFile:
    """`train_log.jsonl`: one JSON object per optimizer step (and per validation), flushed as
    written, main process only. On resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path, keep_until: int | None) -> None:
        from samed2_kit.utils.atomic import write_text

        self.path = path
        lines = []
        if keep_until is not None and path.is_file():
            lines = [ln for ln in path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["step"] <= keep_until]  # fmt: skip
        write_text(path, "".join(ln + "\n" for ln in lines))
        self.entries = [json.loads(ln) for ln in lines]
        self.f = open(path, "a")  # noqa: SIM115 (closed in close())

    def write(self, entry: dict) -> None:
        self.entries.append(entry)
        self.f.write(json.dumps(entry) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_log(run_dir) -> list[dict]:
    """Entries of a run's train_log.jsonl ([] when absent)."""
    from pathlib import Path

    path = Path(run_dir) / LOG
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _datasets(recipe: Recipe, data) -> list:
    from samed2_kit.engine.data import store_dataset

    if isinstance(data, str | bytes) or hasattr(data, "__fspath__"):
        data = [store_dataset(recipe, str(data), recipe.data.tasks, recipe.train.seed)]
    if recipe.data.episodes:
        from samed2_kit.engine.episodes import Episodes

        data = [d if isinstance(d, Episodes) else Episodes(d, recipe.train.seed) for d in data]
    return list(data)


def _support_kwargs(batch: dict) -> dict:
    """Model keyword arguments for an episode batch's supports (support b serves query b)."""
    if "support_image" not in batch:
        return {}
    n = len(batch["support_image"])
    index = torch.arange(n, device=batch["support_image"].device)
    return {"support_images": batch["support_image"], "support_masks": batch["support_mask"],
            "support_index": index}  # fmt: skip


def _stateful_sources(model) -> dict:
    """Prompt sources that learn without gradients (`candidates` + `commit`), by name."""
    return {n: s for n, s in model.prompt_sources.items() if hasattr(s, "commit")}


def train(
    recipe: Recipe,
    model,
    data,
    run_dir=None,
    *,
    resume: bool = False,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
):
    """Train `model` (a SAMed2Model) in place; returns (model, TrainResult, accelerator).

    Args:
        data: a medbank store folder (its `data.train_split`, `data.tasks`), or a list of datasets
            with `set_epoch` (e.g. StoreDatasets: new task + replayed examples), concatenated.
        run_dir: where checkpoints (`train.save_every`, last `train.keep_last`), the step log and
            TensorBoard events go; None: nothing is written.
        resume: continue from the newest checkpoint in `run_dir` (exactly: same losses as an
            uninterrupted run), after checking it was written by this recipe, model and launch.
        validate: called on every rank every `train.val_every` steps and at the end with the
            unwrapped model; returns {name: value} to log (e.g. validation Dice per task).
    """
    from pathlib import Path

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
    from tqdm.auto import tqdm

    from samed2_kit.engine import state as ckpt
    from samed2_kit.engine.data import EpochIndexed, make_loader, to_device
    from samed2_kit.losses import SegLoss

    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else None
    mp = resolve_mixed_precision(cfg.mixed_precision)
    tb = run_dir is not None and cfg.tensorboard
    accelerator = Accelerator(
        mixed_precision=mp,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if tb else None,
        project_dir=str(run_dir) if tb else None,
    )
    main, world = accelerator.is_main_process, accelerator.num_processes
    set_seed(cfg.seed)
    groups, n_trainable = param_groups(model, cfg)
    dataset = EpochIndexed(_datasets(recipe, data))
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    want = {"recipe": resume_key(recipe), "frozen_sha256": ckpt.frozen_sha256(model),
            "world": world, "samples": len(dataset)}  # fmt: skip
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    mem = raw.memory  # the confidence memory (None without): written from every rank's batches
    stateful = _stateful_sources(raw)  # e.g. the similarity prior: updated like the memory

    pos = ckpt.Position()
    if resume:
        found = ckpt.checkpoint_dirs(run_dir) if run_dir else []
        if not found:
            raise ValueError(f"nothing to resume: {run_dir} has no checkpoints/step-* folder")
        meta = ckpt.read_state(found[-1])["meta"]
        check_resume(meta, want, found[-1])
        pos = ckpt.load(found[-1], raw, opt, sched, accelerator.process_index)
        if mem is not None:
            from samed2_kit.memory import MEMORY_FILE, ConfidenceMemory

            mem.bank = ConfidenceMemory.load(found[-1] / MEMORY_FILE, mem.bank.model, mem.cfg)
        # the LR at this step from *this* schedule (train.steps may have been raised): the same
        # value as saved when it was not
        for g, base, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            g["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        if main:
            print(f"[samed2] resumed from {found[-1]} (step {pos.step})")
    log = StepLogFile(run_dir / LOG, pos.step if resume else None) if run_dir and main else None
    if tb:
        accelerator.init_trackers("tensorboard", config=_flat_config(recipe))
    loader = make_loader(dataset, recipe, accelerator.process_index, world, pos.consumed)
    batches = iter(loader)
    loss_fn = SegLoss(recipe.loss)
    model.train()

    result = TrainResult(
        trainable_params=n_trainable, mixed_precision=mp, train_samples=len(dataset)
    )
    bar = tqdm(total=cfg.steps, initial=pos.step, desc="train", disable=not (progress and main))
    t0 = t_last = time.perf_counter()
    seen, start_step = 0, pos.step
    if mem is not None:
        mem.writing = True  # only here: evaluation and prediction never write
    while pos.step < cfg.steps:
        total = torch.zeros((), device=accelerator.device)
        entries, updates = [], {name: [] for name in stateful}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(batches), accelerator.device)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                prompts = batch_prompts(batch, recipe.data.prompt.mode)
                meta = {k: batch[k] for k in ("case_id", "task", "modality")}
                out = model(batch["image"], prompts, cfg.multimask, batch["clip_len"], meta,
                            **_support_kwargs(batch))  # fmt: skip
                loss = loss_fn(out.low_res_logits, out.iou, out.object_score_logits, batch["mask"],
                               out.source_logits)  # fmt: skip
                accelerator.backward(loss.total / cfg.grad_accum)
            total += loss.total.detach() / cfg.grad_accum
            if mem is not None:
                entries += mem.candidates(raw.sam, out, meta, pos.step + 1)
            for name, src in stateful.items():
                updates[name].append(src.candidates(out.encoder_features, batch["mask"], meta))
            pos.consumed += 1
            seen += len(batch["image"]) * world
        if cfg.clip_grad > 0:
            accelerator.clip_grad_norm_(params, cfg.clip_grad)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        pos.step += 1
        if mem is not None:  # every rank applies every rank's entries, in rank order
            mem.commit(gather_object(entries) if world > 1 else entries)
        mean_loss = float(accelerator.reduce(total, "mean"))  # over processes: the global batch
        for name, src in stateful.items():  # the same: identical state on every rank
            src.commit(gather_object(updates[name]) if world > 1 else updates[name], mean_loss)
        now = time.perf_counter()
        sps, seen, t_last = seen / max(now - t_last, 1e-9), 0, now
        entry = StepLog(pos.step, mean_loss, loss.parts, lr, sps)
        result.history.append(entry)
        if log:
            log.write(asdict(entry))
        bar.update(1)
        if pos.step % cfg.log_every == 0 or pos.step == cfg.steps:
            recent = result.history[-cfg.log_every :]
            avg = sum(h.loss for h in recent) / len(recent)
            bar.set_postfix(loss=f"{avg:.4f}", samples_s=f"{sps:.1f}")
            if tb:
                accelerator.log({"train/loss": avg, "train/lr": lr, "train/samples_per_s": sps},
                                step=pos.step)  # fmt: skip
        last = pos.step == cfg.steps
        # validation before the checkpoint: a checkpoint at step n implies its log is complete
        if validate and cfg.val_every and (pos.step % cfg.val_every == 0 or last):
            values = validate(raw)
            model.train()
            if log:
                log.write({"step": pos.step, "val": values})
            if tb:
                accelerator.log({f"val/{k}": v for k, v in values.items()}, step=pos.step)
        if run_dir and cfg.save_every and (pos.step % cfg.save_every == 0 or last):
            rngs = gather_object([ckpt.rng_state()])
            if main:
                meta = {**want, "step": pos.step}
                files = {"memory.safetensors": mem.bank.save} if mem is not None else None
                ckpt.save(run_dir, raw, opt, sched, pos, meta, rngs, keep_last=cfg.keep_last,
                          writers=files)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()
    if mem is not None:
        mem.writing = False
    result.seconds = time.perf_counter() - t0
    result.steps_run = pos.step - start_step
    if log:
        result.log = log.entries
        log.close()
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.wait_for_everyone()
    return raw, result, accelerator


def _flat_config(recipe: Recipe) -> dict:
    """Recipe as flat scalars for TensorBoard's hparams (lists/None as strings)."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                walk(v, key)
            else:
                out[key] = v if isinstance(v, int | float | str | bool) else str(v)

    walk(to_dict(recipe), "")
    return out
