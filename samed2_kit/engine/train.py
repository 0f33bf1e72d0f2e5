"""The training loop on Hugging Face Accelerate (one CPU, one GPU or many: the same code).

AdamW, cosine schedule with linear warm-up, bf16 autocast where the device has it, gradient
accumulation and clipping, seeded data order and prompts, a progress bar with loss and samples/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from samed2_kit.config import Recipe


@dataclass
class StepLog:
    step: int
    loss: float
    parts: dict[str, float]
    lr: float
    samples_per_s: float


@dataclass
class TrainResult:
    history: list[StepLog] = field(default_factory=list)
    seconds: float = 0.0
    trainable_params: int = 0
    mixed_precision: str = "no"
    train_samples: int = 0


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


def make_loader(recipe: Recipe, store: str, seed: int):
    """StoreDataset over the recipe's training split + a seeded, shuffling DataLoader."""
    from samed2_kit.medbank.dataset import StoreDataset, collate_clips

    d = recipe.data
    ds = StoreDataset(
        store,
        split=d.train_split,
        clip_len=d.clip_len,
        image_size=recipe.model.image_size,
        prompt=d.prompt,
        seed=seed,
        augment=d.augment,
        tasks=d.tasks,
    )
    if len(ds) < recipe.train.batch_size:
        raise ValueError(
            f"the training split has {len(ds)} samples, fewer than train.batch_size="
            f"{recipe.train.batch_size}: lower the batch size or add data"
        )
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=recipe.train.batch_size,
        shuffle=True,
        drop_last=True,
        generator=gen,
        collate_fn=collate_clips,
        num_workers=d.num_workers,
    )
    return ds, loader


def train(recipe: Recipe, model, store: str, accelerator=None, progress: bool = True):
    """Train `model` (a SAMed2Model) on the training split of a medbank `store`; in place.

    Returns a TrainResult with the per-step loss history.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    from samed2_kit.losses import SegLoss

    cfg = recipe.train
    mp = resolve_mixed_precision(cfg.mixed_precision)
    if accelerator is None:
        accelerator = Accelerator(
            mixed_precision=mp,
            gradient_accumulation_steps=cfg.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
    set_seed(cfg.seed)
    groups, n_trainable = param_groups(model, cfg)
    ds, loader = make_loader(recipe, store, cfg.seed)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    loss_fn = SegLoss(recipe.loss)
    model.train()

    result = TrainResult(trainable_params=n_trainable, mixed_precision=mp, train_samples=len(ds))
    bar = tqdm(
        total=cfg.steps, desc="train", disable=not (progress and accelerator.is_main_process)
    )
    step, epoch, t0 = 0, 0, time.perf_counter()
    seen, t_last = 0, t0
    while step < cfg.steps:
        ds.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(
                    batch["image"], batch_prompts(batch, recipe.data.prompt.mode), cfg.multimask
                )
                loss = loss_fn(out.low_res_logits, out.iou, out.object_score_logits, batch["mask"])
                accelerator.backward(loss.total)
                if accelerator.sync_gradients and cfg.clip_grad > 0:
                    accelerator.clip_grad_norm_(params, cfg.clip_grad)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            seen += len(batch["image"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            step += 1
            now = time.perf_counter()
            sps = seen / max(now - t_last, 1e-9)
            seen, t_last = 0, now
            result.history.append(
                StepLog(step, float(loss.total.detach()), loss.parts, sched.get_last_lr()[0], sps)
            )
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = result.history[-cfg.log_every :]
                avg = sum(h.loss for h in recent) / len(recent)
                bar.set_postfix(loss=f"{avg:.4f}", samples_s=f"{sps:.1f}")
            if step >= cfg.steps:
                break
        epoch += 1
    bar.close()
    result.seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(model), result, accelerator
