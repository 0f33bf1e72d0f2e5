"""One slice conditioned on earlier results: the step SAM 2's video path repeats, shared by volume
propagation (`propagate_volume`, inference) and sequence training (`sequence_forward`).

    first = prompted(model, feats, prompts)           # a prompted slice: decoder, memory, pointer
    up = Pass.begin(model.sam, first, frames=6, num_frames=n)      # one direction from it
    mems, pointers = up.context()                     # (n, B, m, h, w), object pointers
    nxt = propagated(model, feats2, list(mems.unbind(1)), pointers=pointers)
    up.add(nxt)

Shapes: a batch of B slices (one per object); memory features (m, h, w) with m the memory
width and h = w = S/16; logits at S/4.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from samed2_kit.engine.clicks import Round, correct
from samed2_kit.model import _sam2
from samed2_kit.types import ImageFeatures, Prompts, SAMed2Output

NO_OBJECT_LOGIT = -1024.0  # sam2's NO_OBJ_SCORE: mask logits of a slice without the object


@dataclass
class SliceResult:
    """raw_logits (B, 1, S/4, S/4) the decoder's; low_res_logits the same, set to
    NO_OBJECT_LOGIT where the object score says "absent" (what is shown and remembered);
    iou (B, 1); object_score_logits (B, 1); memory (B, m, h, w) its memory features and
    pointer (B, C) its object pointer (after corrective rounds: of the last round, whose logits
    low_res_logits then holds)."""

    raw_logits: torch.Tensor
    low_res_logits: torch.Tensor
    iou: torch.Tensor
    object_score_logits: torch.Tensor
    memory: torch.Tensor
    pointer: torch.Tensor
    rounds: list = field(default_factory=list)  # training's corrective passes (`engine.clicks`)


@dataclass
class Pass:
    """One direction of propagation from a prompted slice (`start`): what the next slice attends
    to. `frames`: recent results whose memory features it reads (0: none, and no pointers);
    `num_frames`: the sequence's length; `pointer_limit`: recent object pointers read (sam2:
    min(num_frames, max_obj_ptrs_in_encoder) - 1). Make one with `Pass.begin`."""

    start: SliceResult
    frames: int
    num_frames: int
    pointer_limit: int
    memories: list = field(default_factory=list)  # (B, m, h, w) of recent results, newest first
    pointers: list = field(default_factory=list)  # (B, C) of recent results, newest first
    seen: int = 0  # results added so far

    @classmethod
    def begin(cls, sam, start: SliceResult, frames: int, num_frames: int) -> Pass:
        return cls(start, frames, num_frames, min(num_frames, sam.max_obj_ptrs_in_encoder) - 1)

    def context(self) -> tuple:
        """(memory (n, B, m, h, w): the `frames` newest then the prompted slice's, or None;
        object pointers for `_sam2.attend_memory`: the prompted slice's, k + 1 slices back after
        k results, then the newest ones, or None)."""
        if not self.frames:
            return None, None
        mems = torch.stack([*self.memories, self.start.memory])
        ptrs = torch.stack([self.start.pointer, *self.pointers])
        distances = [self.seen + 1, *range(1, len(self.pointers) + 1)]
        return mems, (ptrs, distances, self.num_frames)

    def add(self, res: SliceResult) -> None:
        self.memories = [res.memory, *self.memories][: self.frames]
        self.pointers = [res.pointer, *self.pointers][: self.pointer_limit]
        self.seen += 1


def prompted(model, feats: ImageFeatures, prompts: Prompts, meta: dict | None = None,
             correct=None) -> SliceResult:  # fmt: skip
    """Slices with a prompt: the decoder (memory and prompt sources as in 2D prediction), then
    the memory encoder on the encoder features and the logits. While training, the decoder's
    unstable-mask fallback runs as at inference (`_sam2.decode`). `correct(decode, logits)`:
    corrective rounds (training's `engine.clicks.correct`, bound to its batch) whose last logits
    replace the first for the memory; the rounds are in the result's `rounds`."""
    res = model.decode(feats, prompts, False, meta, fallback_in_training=True)
    raw = low = res.low_res_logits
    obj, iou, tokens, rounds = res.object_score_logits, res.iou, res.tokens, []
    if correct is not None:

        def decode(index: torch.Tensor, p: Prompts):
            rows = index.tolist()
            sub = {k: [v[i] for i in rows] for k, v in (meta or {}).items()}
            r = model.decode(feats.select(index), p, False, sub, fallback_in_training=True)
            return r.low_res_logits, r.iou, r.object_score_logits, r.tokens

        rounds = correct(decode, low)
        if rounds:
            last = rounds[-1]
            low, obj, iou, tokens = low.clone(), obj.clone(), iou.clone(), tokens.clone()
            low[last.index], obj[last.index] = last.low_res_logits, last.object_score_logits
            iou[last.index], tokens[last.index] = last.iou, last.tokens
    memory = _sam2.encode_memory(model.sam, feats, low, obj)
    pointer = _sam2.object_pointer(model.sam, tokens, iou, obj)
    return SliceResult(raw, low, res.iou, res.object_score_logits, memory, pointer, rounds)


def _condition(model, feats: ImageFeatures, mems: list, meta: dict,
               pointers: tuple | None = None) -> ImageFeatures:  # fmt: skip
    """feats conditioned by memory attention on each image's earlier results (n_i, m, h, w):
    recent ones newest first, the prompted slice's last (`Pass.context`), with sam2's temporal
    encodings (`_sam2.frame_slots`), and the batch's object `pointers` ((P, B, C), distances,
    sequence length); plus the confidence bank's entries for it (read only; while training, never
    entries of the image's own case, `meta["case_id"]`)."""
    sam = model.sam
    bank = (
        model.memory.retrieve(sam, feats, meta) if model.memory is not None else [None] * len(mems)
    )

    def entries(m, k):  # (memory (n, m, h, w) or None, temporal slots)
        slots = [] if m is None else _sam2.frame_slots(sam, len(m) - 1)
        if k is not None:
            slots += _sam2.retrieved_slots(sam, len(k))  # as the bank's own reads
        both = [x for x in (m, k) if x is not None]
        return (torch.cat(both) if both else None), slots

    pairs = [entries(m, k) for m, k in zip(mems, bank, strict=True)]
    if all(m is None for m, _ in pairs):
        return feats
    embed = feats.image_embed
    if len({(m is None, tuple(s)) for m, s in pairs}) == 1:  # one call for the batch
        out = _sam2.attend_memory(sam, feats, torch.stack([m for m, _ in pairs]), pairs[0][1],
                                  pointers)  # fmt: skip
        return ImageFeatures(out.to(embed.dtype), feats.high_res, feats.pos)
    rows = []
    for b, (m, slots) in enumerate(pairs):
        one = feats.select(slice(b, b + 1))
        ptr = None if pointers is None else (pointers[0][:, b : b + 1], *pointers[1:])
        rows.append(one.image_embed if m is None else _sam2.attend_memory(sam, one, m[None], slots,
                                                                          ptr))  # fmt: skip
    return ImageFeatures(torch.cat(rows).to(embed.dtype), feats.high_res, feats.pos)


def propagated(model, feats: ImageFeatures, mems: list, meta: dict | None = None,
               pointers: tuple | None = None) -> SliceResult:  # fmt: skip
    """Slices without a prompt, each conditioned on its earlier results `mems[b]` (n_b, m, h, w),
    newest first with the prompted slice's last, or None, and on the batch's object `pointers`
    (`Pass.context`): SAM 2's memory attention, the decoder with sam2's padding point (the
    prompt sources' clicks where they suggest some), the logits set to "no object" where the
    object score is <= 0, the memory encoder on those and the object pointer. `meta`: per-image
    lists (`case_id`, `task`, `modality`) for the confidence bank's retrieval."""
    cond = _condition(model, feats, list(mems), meta or {}, pointers)
    res = model.decode(cond, Prompts(), False, use_memory=False, fallback_in_training=True,
                       pad_empty=True)  # fmt: skip
    obj = res.object_score_logits
    low = torch.where((obj > 0)[..., None, None], res.low_res_logits, NO_OBJECT_LOGIT)
    memory = _sam2.encode_memory(model.sam, feats, low, obj)
    pointer = _sam2.object_pointer(model.sam, res.tokens, res.iou, obj)
    return SliceResult(res.low_res_logits, low, res.iou, obj, memory, pointer)


def _order(n: int) -> list[int]:
    """Slices in visiting order from the centre c = n // 2: up, then down."""
    c = n // 2
    return [*range(c + 1, n), *range(c - 1, -1, -1)]


def sequence_forward(model, batch: dict, memory_frames: int = 6, clicks=None) -> SAMed2Output:
    """Runs of N consecutive slices (batch["clip_len"] = N, run-major): the centre slice of
    each gets the clip's prompt; the others are predicted outward from it, up then down, each
    from its own features conditioned on the results before it in its direction (the prompted
    slice always among them), as `propagate_volume` does. The encoder sees clips of the model's
    T (`spec.clip_len`, which must divide N). Returns the output over all B*N slices in batch
    order, with the decoder's raw logits (for the loss)."""
    n, t = int(batch["clip_len"]), int(model.spec.clip_len)
    images = batch["image"]
    if n < 2 or n % t:
        raise ValueError(
            f"sequence training takes runs of N >= 2 slices that the model's clip length "
            f"T={t} divides (data.sequence_len={n}): set data.sequence_len to a multiple of {t}, e.g. "
            f"{t * max(2, 7 // t)}"
        )
    b = images.shape[0] // n
    meta = {k: batch[k] for k in ("case_id", "task", "modality") if k in batch}
    feats = model.encode(images, t, meta)
    c = n // 2

    def rows(k: int) -> torch.Tensor:
        return torch.arange(b, device=images.device) * n + k

    centre = rows(c)
    prompts = Prompts(
        batch["points"][centre] if batch["points"].shape[1] else None,
        batch["point_labels"][centre] if batch["points"].shape[1] else None,
        batch["box"][centre] if bool(batch["has_box"][centre].all()) else None,
    )
    fix = None
    if clicks is not None and clicks.prob > 0:  # corrective clicks on the prompted slices
        gt, seeds = batch["mask"][centre], batch["seed"].tolist()
        valid = batch["valid"][centre] if batch.get("valid") is not None else None
        fix = functools.partial(correct, prompts=prompts, gt=gt, seeds=seeds, cfg=clicks,
                                valid=valid)  # fmt: skip
    done = {c: prompted(model, feats.select(centre), prompts, meta, fix)}
    passes = {step: Pass.begin(model.sam, done[c], memory_frames, n) for step in (1, -1)}
    for k in _order(n):
        now = passes[1 if k > c else -1]
        mems, pointers = now.context()  # (n_mem, B, m, h, w), object pointers
        per_image = [None] * b if mems is None else list(mems.unbind(1))
        done[k] = propagated(model, feats.select(rows(k)), per_image, meta, pointers)
        now.add(done[k])
    # results are slice-major (k * B + clip); the batch is clip-major (clip * N + k)
    order = torch.arange(n * b, device=images.device).reshape(n, b).T.reshape(-1)

    def gather(field: str) -> torch.Tensor:
        return torch.cat([getattr(done[k], field) for k in range(n)])[order]

    rounds = [Round(centre[r.index], r.low_res_logits, r.iou, r.object_score_logits)
              for r in done[c].rounds]  # fmt: skip
    return SAMed2Output(gather("raw_logits"), gather("iou"), gather("object_score_logits"),
                        feats, feats, rounds=rounds)  # fmt: skip
