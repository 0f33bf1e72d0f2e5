"""Kinds of training step: what one micro-batch does between the loader and the optimizer.

A step is called as `step(model, batch, recipe, loss_fn) -> StepResult`, once per micro-batch,
with the (DDP-wrapped) model: one forward through it, and the loss to back-propagate. The loop
around it (`engine.train`) is the same for every kind; `train(..., step=name)` picks one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from samed2_kit.config import Recipe
from samed2_kit.types import Prompts


def batch_prompts(batch: dict, mode: str):
    """Prompts for a collated batch, following the prompt mode the dataset sampled."""
    boxes = batch["box"] if "box" in mode else None
    points = labels = None
    if "point" in mode:
        points, labels = batch["points"], batch["point_labels"]
    return Prompts(points=points, point_labels=labels, boxes=boxes)


def fov_kwargs(batch: dict) -> dict:
    """The loss's keyword for the batch's field of view: {"valid": (B, 1, S, S)} when the batch
    has one (`medbank.dataset.collate_clips`), else {} (the loss sees every pixel, as before)."""
    return {} if batch.get("valid") is None else {"valid": batch["valid"]}


def _support_kwargs(batch: dict) -> dict:
    """Model keyword arguments for an episode batch's supports (support b serves query b)."""
    if "support_image" not in batch:
        return {}
    n = len(batch["support_image"])
    index = torch.arange(n, device=batch["support_image"].device)
    return {"support_images": batch["support_image"], "support_masks": batch["support_mask"],
            "support_index": index}  # fmt: skip


@dataclass
class StepResult:
    """One micro-batch's result: the loss (its `total` is back-propagated), the model's output
    and the batch metadata (what the parts that learn without gradients read)."""

    loss: object  # samed2_kit.losses.LossOutput
    out: object  # samed2_kit.types.SAMed2Output
    meta: dict


def image_step(model, batch: dict, recipe: Recipe, loss_fn) -> StepResult:
    """The training step on images (or clips of T adjacent slices), one prompt per image: one
    forward through the (DDP-wrapped) model, the segmentation loss against `batch["mask"]`
    (inside `batch["valid"]`, the field of view, when the batch has one); with `train.clicks`,
    also the corrective rounds' (`engine.clicks`), whose clicks stay inside the field of view."""
    from samed2_kit.engine.clicks import round_loss

    prompts = batch_prompts(batch, recipe.data.prompt.mode)
    meta = {k: batch[k] for k in ("case_id", "task", "modality")}
    if recipe.train.clicks.prob > 0:
        if "support_image" in batch:
            raise ValueError("train.clicks does not take few-shot episodes: set "
                             "train.clicks.prob=0 or data.episodes=false")  # fmt: skip
        run = functools.partial(_clicked_forward, prompts=prompts, recipe=recipe, meta=meta)
        out = model(batch, run=run)
    else:
        out = model(batch["image"], prompts, recipe.train.multimask, batch["clip_len"], meta,
                    **_support_kwargs(batch))  # fmt: skip
    valid = batch.get("valid")
    loss = loss_fn(out.low_res_logits, out.iou, out.object_score_logits, batch["mask"],
                   out.source_logits, **fov_kwargs(batch))  # fmt: skip
    return StepResult(round_loss(loss_fn, loss, out.rounds, batch["mask"], valid), out, meta)


def _clicked_forward(model, batch: dict, prompts: Prompts, recipe: Recipe, meta: dict):
    """model.forward's encode + decode, then the corrective rounds on the same features."""
    from samed2_kit.engine.clicks import chosen_mask, correct
    from samed2_kit.utils.meta import per_image

    feats = model.encode(batch["image"], batch["clip_len"], meta)
    out = model.decode(feats, prompts, recipe.train.multimask, meta)
    n = feats.image_embed.shape[0]
    row_meta = {k: per_image(v, n) for k, v in meta.items()}

    def decode(index: torch.Tensor, p: Prompts):
        rows = index.tolist()
        sub = {k: None if v is None else [v[i] for i in rows] for k, v in row_meta.items()}
        res = model.decode(feats.select(index), p, False, sub)
        return res.low_res_logits, res.iou, res.object_score_logits

    first = chosen_mask(out.low_res_logits, out.iou)
    out.rounds = correct(decode, first, prompts, batch["mask"], batch["seed"].tolist(),
                         recipe.train.clicks, int(batch["clip_len"]),
                         valid=batch.get("valid"))  # fmt: skip
    return out


def sequence_step(model, batch: dict, recipe: Recipe, loss_fn) -> StepResult:
    """Training on clips of N consecutive slices of one object (`data.clip_len` = N): the centre
    slice prompted (and corrected with `train.clicks`), the others propagated from it through SAM 2's
    memory path, exactly as `propagate_volume` does at inference (`samed2_kit.volume.sequence`);
    the loss on every slice and corrective pass (the decoder's logits; an absent object is the
    object-score term's)."""
    from samed2_kit.volume.sequence import sequence_forward

    if recipe.data.episodes:
        raise ValueError(
            "train.step=sequence does not take few-shot episodes: set data.episodes=false"
        )
    from samed2_kit.engine.clicks import round_loss

    run = functools.partial(sequence_forward, memory_frames=recipe.train.memory_frames,
                            clicks=recipe.train.clicks)  # fmt: skip
    out = model(batch, run=run)
    meta = {k: batch[k] for k in ("case_id", "task", "modality")}
    loss = loss_fn(out.low_res_logits, out.iou, out.object_score_logits, batch["mask"], {},
                   **fov_kwargs(batch))  # fmt: skip
    rounds = round_loss(loss_fn, loss, out.rounds, batch["mask"], batch.get("valid"))
    return StepResult(rounds, out, meta)


# kinds of training step, by name (`train.step` of a recipe); a step is called as
# step(model, batch, recipe, loss_fn) -> StepResult, once per micro-batch
STEPS: dict[str, Callable] = {"image": image_step, "sequence": sequence_step}
