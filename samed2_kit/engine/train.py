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
from samed2_kit.engine.resume import check_resume, resume_key
from samed2_kit.engine.steps import STEPS, StepResult, batch_prompts, image_step

__all__ = [
    "STEPS", "StepLog", "StepResult", "TrainResult", "apply_train_mode", "batch_prompts",
    "check_resume", "cosine_with_warmup", "image_step", "param_groups", "read_log",
    "resolve_mixed_precision", "resume_key", "train",
]  # fmt: skip


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


def param_groups(model, cfg) -> tuple[list[dict], int]:
    """Optimizer groups (LR = train.lr x multiplier) and the trainable-parameter count, from the
    recipe's `train.trainable` policy, else from `train.mode` (plus the `propagation` group when
    sequence training runs it)."""
    from samed2_kit.adapters.freeze import FreezePolicy, apply_policy, policy_for_mode

    if cfg.trainable:
        policy = FreezePolicy(cfg.trainable, dict(cfg.lr_mult))
    else:
        policy = policy_for_mode(model, cfg.mode, dict(cfg.lr_mult))
        if cfg.step == "sequence" and "memory" not in policy.train:
            policy.train.append("propagation")
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


LOG = "train_log.jsonl"


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


@dataclass
class _Session:
    """What one `train` call holds while it runs."""

    recipe: Recipe
    accelerator: object
    model: torch.nn.Module  # as prepared by Accelerate (DDP-wrapped on several processes)
    raw: torch.nn.Module  # the SAMed2Model itself
    opt: object
    sched: object
    params: list
    dataset: object
    want: dict  # what a checkpoint of this run is bound to (`check_resume`)
    result: TrainResult
    tensorboard: bool = False  # event files in the run folder
    log: StepLogFile | None = None
    t_last: float = 0.0
    seen: int = 0  # samples since the last step log (all processes)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes


def _setup(recipe: Recipe, model, data, run_dir: Path | None) -> _Session:
    """Accelerator, seed, parameter groups, optimizer, schedule, data; the model prepared."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from samed2_kit.engine import state as ckpt
    from samed2_kit.engine.data import EpochIndexed

    cfg = recipe.train
    mp = resolve_mixed_precision(cfg.mixed_precision)
    tb = run_dir is not None and cfg.tensorboard
    accelerator = Accelerator(
        mixed_precision=mp,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with="tensorboard" if tb else None,
        project_dir=str(run_dir) if tb else None,
    )
    set_seed(cfg.seed)
    groups, n_trainable = param_groups(model, cfg)
    dataset = EpochIndexed(_datasets(recipe, data))
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    want = {"recipe": resume_key(recipe), "frozen_sha256": ckpt.frozen_sha256(model),
            "world": accelerator.num_processes, "samples": len(dataset)}  # fmt: skip
    prepared, opt = accelerator.prepare(model, opt)
    result = TrainResult(trainable_params=n_trainable, mixed_precision=mp,
                         train_samples=len(dataset))  # fmt: skip
    return _Session(recipe, accelerator, prepared, accelerator.unwrap_model(prepared), opt, sched,
                    params, dataset, want, result, tb)  # fmt: skip


def _resume(s: _Session, run_dir: Path | None):
    """Model, optimizer, schedule, RNG and learners' state from the newest checkpoint."""
    from samed2_kit.engine import state as ckpt
    from samed2_kit.model import assemble

    found = ckpt.checkpoint_dirs(run_dir) if run_dir else []
    if not found:
        raise ValueError(f"nothing to resume: {run_dir} has no checkpoints/step-* folder")
    meta = ckpt.read_state(found[-1])["meta"]
    check_resume(meta, s.want, found[-1])
    pos = ckpt.load(found[-1], s.raw, s.opt, s.sched, s.accelerator.process_index)
    assemble.load_state(s.raw, found[-1])
    # the LR at this step from *this* schedule (train.steps may have been raised): the same
    # value as saved when it was not
    for g, base, fn in zip(s.opt.param_groups, s.sched.base_lrs, s.sched.lr_lambdas, strict=True):
        g["lr"] = base * fn(s.sched.last_epoch)
    if s.main:
        print(f"[samed2] resumed from {found[-1]} (step {pos.step})")
    return pos


def _optimizer_step(s: _Session, batches, pos, step_fn, loss_fn) -> tuple[float, dict, float]:
    """`train.grad_accum` micro-batches, one optimizer step, then every learner's commit;
    returns (mean loss over the global batch, this process's last loss terms, the step's LR)."""
    from accelerate.utils import gather_object

    from samed2_kit.engine.data import to_device
    from samed2_kit.types import TrainUpdate

    cfg = s.recipe.train
    learners = s.raw.learners()
    total = torch.zeros((), device=s.accelerator.device)
    items: dict[str, list] = {name: [] for name in learners}
    for micro in range(cfg.grad_accum):
        batch = to_device(next(batches), s.accelerator.device)
        sync = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else s.accelerator.no_sync(s.model):
            res = step_fn(s.model, batch, s.recipe, loss_fn)
            s.accelerator.backward(res.loss.total / cfg.grad_accum)
        total += res.loss.total.detach() / cfg.grad_accum
        update = TrainUpdate(s.raw.sam, res.out, batch["mask"], res.meta, pos.step + 1)
        for name, part in learners.items():
            items[name].append(part.candidates(update))
        pos.consumed += 1
        s.seen += len(batch["image"]) * s.world
    if cfg.clip_grad > 0:
        s.accelerator.clip_grad_norm_(s.params, cfg.clip_grad)
    lr = s.opt.param_groups[0]["lr"]
    s.opt.step()
    s.sched.step()
    s.opt.zero_grad(set_to_none=True)
    pos.step += 1
    mean_loss = float(s.accelerator.reduce(total, "mean"))  # over processes: the global batch
    for name, part in learners.items():  # every rank applies every rank's items, in rank order
        part.commit(gather_object(items[name]) if s.world > 1 else items[name], mean_loss)
    return mean_loss, res.loss.parts, lr


def _record(s: _Session, pos, mean_loss: float, parts: dict, lr: float, bar) -> None:
    """The step's log line, progress bar and TensorBoard scalars."""
    cfg = s.recipe.train
    now = time.perf_counter()
    sps, s.seen, s.t_last = s.seen / max(now - s.t_last, 1e-9), 0, now
    entry = StepLog(pos.step, mean_loss, parts, lr, sps)
    s.result.history.append(entry)
    if s.log:
        s.log.write(asdict(entry))
    bar.update(1)
    if pos.step % cfg.log_every == 0 or pos.step == cfg.steps:
        recent = s.result.history[-cfg.log_every :]
        avg = sum(h.loss for h in recent) / len(recent)
        bar.set_postfix(loss=f"{avg:.4f}", samples_s=f"{sps:.1f}")
        if s.tensorboard:
            s.accelerator.log({"train/loss": avg, "train/lr": lr, "train/samples_per_s": sps},
                              step=pos.step)  # fmt: skip


def _validate(s: _Session, pos, validate) -> None:
    """Validation every `train.val_every` steps and at the end (before that step's checkpoint:
    a checkpoint at step n implies its log is complete)."""
    cfg = s.recipe.train
    if not (validate and cfg.val_every):
        return
    if pos.step % cfg.val_every and pos.step != cfg.steps:
        return
    values = validate(s.raw)
    s.model.train()
    if s.log:
        s.log.write({"step": pos.step, "val": values})
    if s.tensorboard:
        s.accelerator.log({f"val/{k}": v for k, v in values.items()}, step=pos.step)


def _checkpoint(s: _Session, pos, run_dir: Path | None) -> None:
    """A checkpoint every `train.save_every` steps and at the end (main process writes)."""
    from accelerate.utils import gather_object

    from samed2_kit.engine import state as ckpt
    from samed2_kit.model import assemble

    cfg = s.recipe.train
    if not (run_dir and cfg.save_every) or (pos.step % cfg.save_every and pos.step != cfg.steps):
        return
    rngs = gather_object([ckpt.rng_state()])
    if s.main:
        ckpt.save(run_dir, s.raw, s.opt, s.sched, pos, {**s.want, "step": pos.step}, rngs,
                  keep_last=cfg.keep_last,
                  extra_state=lambda folder: assemble.save_state(s.raw, folder))  # fmt: skip
    s.accelerator.wait_for_everyone()


def train(
    recipe: Recipe,
    model,
    data,
    run_dir=None,
    *,
    resume: bool = False,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    progress: bool = True,
    step: str | Callable | None = None,
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
        step: the kind of training step (a `STEPS` name) or a callable of the same signature;
            None: the recipe's `train.step`.
    """
    from tqdm.auto import tqdm

    from samed2_kit.engine import state as ckpt
    from samed2_kit.engine.data import make_loader
    from samed2_kit.losses import SegLoss

    step = recipe.train.step if step is None else step
    step_fn = STEPS[step] if isinstance(step, str) else step
    cfg = recipe.train
    run_dir = Path(run_dir) if run_dir is not None else None
    s = _setup(recipe, model, data, run_dir)
    pos = _resume(s, run_dir) if resume else ckpt.Position()
    if run_dir and s.main:
        s.log = StepLogFile(run_dir / LOG, pos.step if resume else None)
    if s.tensorboard:
        s.accelerator.init_trackers("tensorboard", config=_flat_config(recipe))
    loader = make_loader(s.dataset, recipe, s.accelerator.process_index, s.world, pos.consumed)
    batches, loss_fn = iter(loader), SegLoss(recipe.loss)
    s.model.train()
    bar = tqdm(total=cfg.steps, initial=pos.step, desc="train", disable=not (progress and s.main))
    t0 = s.t_last = time.perf_counter()
    start_step = pos.step
    with s.raw.learning():  # the memory accepts writes only here
        while pos.step < cfg.steps:
            mean_loss, parts, lr = _optimizer_step(s, batches, pos, step_fn, loss_fn)
            _record(s, pos, mean_loss, parts, lr, bar)
            _validate(s, pos, validate)
            _checkpoint(s, pos, run_dir)
    bar.close()
    s.result.seconds = time.perf_counter() - t0
    s.result.steps_run = pos.step - start_step
    if s.log:
        s.result.log = s.log.entries
        s.log.close()
    for tracker in s.accelerator.trackers:
        tracker.finish()
    s.accelerator.wait_for_everyone()
    return s.raw, s.result, s.accelerator


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
