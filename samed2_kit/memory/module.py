"""`model.memory`: the confidence memory wired into SAMed2Model.

- `condition(sam, feats, meta)` (every forward, any mode): retrieve the top-k entries for each
  image by its key (`retrieve`) and run SAM 2 memory attention over their features (sam2's own
  module, with its temporal position encodings); images with nothing to retrieve keep their
  features, so an empty bank leaves the model exactly as without memory. While training, an image
  never retrieves entries of its own case (`meta["case_id"]`). `retrieve` alone gives the
  entries, for callers that attend over them together with other memories (volume propagation).
- `candidates(update)` / `commit(items, loss)`: the training loop's interface for parts that
  learn without gradients (`samed2_kit.types.Learner`): entries made from a micro-batch's
  predictions (memory encoder on the encoder features + predicted mask; confidence = predicted
  IoU), gathered from every rank and committed in the same order everywhere.
- `save_state(folder)` / `load_state(folder)`: the bank as `folder/memory.safetensors` (final
  models and training checkpoints).

Writes happen only through `commit`, which refuses unless `writing` is on: the training loop turns
it on for the duration of training (`SAMed2Model.learning()`); evaluation and the predictor never do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samed2_kit.memory.bank import ConfidenceMemory, Entry, MemoryConfig
from samed2_kit.model import _sam2
from samed2_kit.types import ImageFeatures, TrainUpdate
from samed2_kit.utils.meta import per_image

MEMORY_FILE = "memory.safetensors"


class MemoryConditioner(nn.Module):
    """Holds a ConfidenceMemory; no parameters of its own (memory attention and the memory
    encoder are sam2's, trained through the `memory` freeze group)."""

    def __init__(self, cfg: MemoryConfig, model_id: dict) -> None:
        super().__init__()
        self.bank = ConfidenceMemory(cfg, model_id)
        self.writing = False
        self._proj: torch.Tensor | None = None  # the key projection, rebuilt from its seed

    @property
    def cfg(self) -> MemoryConfig:
        return self.bank.cfg

    def keys(self, sam, feats: ImageFeatures) -> torch.Tensor:
        """Retrieval keys (B, key_dim): the encoder embedding pooled to g x g (C * g^2 values),
        projected by a fixed Gaussian matrix (seed 0) when key_dim is smaller, L2-normalised.
        A short key keeps a read of 100k entries within a few ms (it is memory-bound)."""
        pooled = F.adaptive_avg_pool2d(_sam2.raw_embed(sam, feats).float(), self.cfg.key_pool)
        pooled = pooled.flatten(1)
        d = self.cfg.key_dim
        if d is not None and d < pooled.shape[1]:
            if self._proj is None or self._proj.shape[0] != pooled.shape[1]:
                gen = torch.Generator().manual_seed(0)
                self._proj = torch.randn(pooled.shape[1], d, generator=gen) / d**0.5
            self._proj = self._proj.to(pooled.device)
            pooled = pooled @ self._proj
        return F.normalize(pooled, dim=1)

    def retrieve(self, sam, feats: ImageFeatures, meta: dict) -> list[torch.Tensor | None]:
        """The bank entries each image of `feats` reads: per image its retrieved memory features
        (n_i, mem_dim, h, w), best first, on the embedding's device and dtype (n_i <= top_k), or
        None when nothing is retrieved (an empty bank, or every entry excluded). Read-only.
        While training, an image never retrieves entries of its own case (`meta["case_id"]`);
        with read_scope "partition", only its (modality, task) partition (`meta["task"]`)."""
        b = feats.image_embed.shape[0]
        if not len(self.bank):
            return [None] * b
        keys = self.keys(sam, feats).detach().cpu()
        exclude = per_image(meta.get("case_id"), b) if self.training else None
        parts = None
        if self.cfg.read_scope == "partition" and meta.get("task") is not None:
            mods = per_image(meta.get("modality") or [""] * len(meta["task"]), b)
            parts = [self.bank.partition_of(m, t) for m, t in zip(mods, per_image(meta["task"], b),
                                                                  strict=True)]  # fmt: skip
        rows, valid = self.bank.top_k(keys, exclude, parts)
        embed = feats.image_embed
        return [
            self.bank.features[rows[i, :n]].to(embed.device, embed.dtype) if n else None
            for i, n in enumerate(valid.sum(1).tolist())
        ]

    def condition(self, sam, feats: ImageFeatures, meta: dict) -> ImageFeatures:
        if not len(self.bank):
            return feats
        mems = self.retrieve(sam, feats, meta)
        counts = torch.tensor([0 if m is None else len(m) for m in mems])
        embed = feats.image_embed
        dev, dtype = embed.device, embed.dtype
        for n in sorted(set(counts.tolist()) - {0}):
            idx = torch.nonzero(counts == n).flatten()
            mem = torch.stack([mems[i] for i in idx.tolist()])  # (b_n, n, m, h, w)
            out = _sam2.attend_memory(sam, feats.select(idx.to(dev)), mem)
            embed = embed.index_copy(0, idx.to(dev), out.to(dtype))
        return ImageFeatures(embed, feats.high_res, feats.pos)

    def candidates(self, update: TrainUpdate) -> list[Entry]:
        """`entries_from` the micro-batch's output (`types.Learner`)."""
        return self.entries_from(update.sam, update.out, update.meta, update.step)

    @torch.no_grad()
    def entries_from(self, sam, out, meta: dict, step: int) -> list[Entry]:
        """Entries from one batch's predictions (on CPU), best of the M masks per image."""
        feats = out.encoder_features
        b = feats.image_embed.shape[0]
        best = out.iou.argmax(dim=1)
        logits = out.low_res_logits[torch.arange(b), best][:, None]
        conf = out.iou[torch.arange(b), best].float()
        if self.cfg.stability:
            hi, lo = (logits > 1.0).flatten(1).sum(1), (logits > -1.0).flatten(1).sum(1)
            conf = conf * (hi.float() / lo.clamp(min=1).float())
        keep = torch.nonzero(conf >= self.cfg.threshold).flatten()
        if not len(keep):
            return []
        sub = feats.select(keep)
        maskmem = _sam2.encode_memory(sam, sub, logits[keep], out.object_score_logits[keep])
        keys = self.keys(sam, sub)
        info = {k: per_image(meta.get(k) or [""] * b, b) for k in ("case_id", "task", "modality")}
        return [
            Entry(keys[j].cpu(), maskmem[j].to(torch.bfloat16).cpu(), float(conf[i]),
                  info["modality"][i], info["task"][i], info["case_id"][i], step)
            for j, i in enumerate(keep.tolist())
        ]  # fmt: skip

    def commit(self, items: list[list[Entry]], loss: float | None = None) -> dict[str, int]:
        """Apply the write policy to every entry of `items` (one list per micro-batch, as
        `candidates` made them), in order; counts per outcome. `loss` is not used."""
        if not self.writing:
            raise RuntimeError(
                "the memory bank is read-only here: only training writes (set "
                "model.memory.writing = True to write explicitly)"
            )
        counts: dict[str, int] = {}
        for e in (e for entries in items for e in entries):
            outcome = self.bank.add(e)
            counts[outcome] = counts.get(outcome, 0) + 1
        return counts

    def save_state(self, folder) -> list[str]:
        """The bank as `folder/memory.safetensors` (atomic); returns the file names written."""
        from pathlib import Path

        self.bank.save(Path(folder) / MEMORY_FILE)
        return [MEMORY_FILE]

    def load_state(self, folder) -> None:
        """Replace the bank by `folder/memory.safetensors` (same model, this config)."""
        from pathlib import Path

        self.bank = ConfidenceMemory.load(Path(folder) / MEMORY_FILE, self.bank.model, self.cfg)


def attach_memory(model, cfg: MemoryConfig) -> MemoryConditioner:
    """Give `model` (SAMed2Model) an empty confidence memory."""
    if model.memory is not None:
        raise ValueError("the model already has a memory")
    model.memory = MemoryConditioner(cfg, model.spec.model_id())
    return model.memory
