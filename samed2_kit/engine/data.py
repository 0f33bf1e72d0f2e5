"""Seeded, resumable data order for training on any number of processes.

The order is defined on *global* micro-batches (batch_size x processes samples), independently of
how many processes read it: epoch ``e`` is the permutation ``default_rng([seed, e, 7])`` of the
dataset, cut into ``len // global_batch`` batches (the remainder is dropped); rank ``r`` of ``W``
takes slice ``[r * B, (r + 1) * B)`` of every global batch. So

- a run on W processes with batch B sees, step by step, the samples a 1-process run with batch
  W x B sees (the distributed test relies on it);
- the position in the stream is one integer, the number of global micro-batches consumed, which a
  checkpoint stores; resuming starts the stream there (no batch is repeated or skipped);
- augmentation and prompts are drawn per (seed, epoch, index) by the dataset, so they resume too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class DatasetView(torch.utils.data.Dataset):
    """A dataset derived from `base` (one with `epoch` and `set_epoch`, e.g. a StoreDataset) that
    shares base's epoch, so that `EpochIndexed` reseeds base's prompts and augmentation through
    it. Subclasses define `__len__` and `__getitem__`."""

    def __init__(self, base) -> None:
        self.base = base

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a dataset with `set_epoch(e)` (or a list of such, concatenated) so that items are
    fetched by `(epoch, index)`: the epoch travels with the index into DataLoader workers."""

    def __init__(self, parts: list) -> None:
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        part = self.parts[k]
        if getattr(part, "epoch", None) != epoch:
            part.set_epoch(epoch)
        return part[int(i - self.offsets[k])]


class GlobalBatches(torch.utils.data.Sampler):
    """Infinite batch sampler: this rank's share of each global micro-batch, from `start` on.

    Yields lists of `(epoch, index)` of length `batch_size`.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0
    ) -> None:
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world, self.start = int(rank), int(world), int(start)
        self.global_batch = self.batch_size * self.world
        self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the training data has {n} samples, fewer than one global batch "
                f"(train.batch_size={batch_size} x {world} process(es)): lower the batch size, "
                "use fewer processes or add data"
            )

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        c = self.start
        epoch, perm = -1, None
        while True:
            e, j = divmod(c, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.order(e)
            lo = j * self.global_batch + self.rank * self.batch_size
            yield [(e, int(i)) for i in perm[lo : lo + self.batch_size]]
            c += 1


def to_device(batch: dict, device) -> dict:
    """Tensors of a collated batch moved to `device` (other values kept)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def store_dataset(recipe, store: str, tasks: list[str] | None, seed: int):
    """The recipe's training split of `store` (restricted to `tasks`) as a StoreDataset."""
    from samed2_kit.medbank.dataset import StoreDataset

    d = recipe.data
    sequences = recipe.train.step == "sequence"
    ds = StoreDataset(
        store,
        split=d.train_split,
        clip_len=d.sequence_len if sequences else d.clip_len,
        image_size=recipe.model.image_size,
        prompt=d.prompt,
        seed=seed,
        augment=d.augment,
        tasks=tasks,
    )
    if sequences:
        check_sequences(ds, d.sequence_len)
    return ds


def check_sequences(ds, n: int) -> None:
    """A clear error when runs of `n` slices cannot come from `ds`'s volumes: a store of 2D
    images, or volumes with fewer than `n` slices (their runs would repeat edge slices)."""
    import numpy as np

    from samed2_kit.medbank.store import open_store

    images = open_store(ds.store_dir)[1].select_columns(["num_slices"]).to_dict()  # Arrow
    num = np.asarray(images["num_slices"])[np.asarray(ds.column("image_row"), dtype=np.int64)]
    if (num <= 1).all():
        raise ValueError(
            f"train.step=sequence trains on runs of slices, but store {ds.store_dir} holds 2D "
            "images only: use train.step=image, or build the store from volumes (NIfTI, NRRD, "
            "DICOM series)"
        )
    thin = sorted({c for c, k in zip(ds.column("case_id"), num, strict=True) if k < n})
    if thin:
        raise ValueError(
            f"data.sequence_len={n} is longer than {len(thin)} volume(s) of store {ds.store_dir} "
            f"(e.g. {', '.join(thin[:3])}: {int(num.min())} slices at least): set "
            f"data.sequence_len <= {int(num.min())}, or leave those cases out of the spec"
        )


def make_loader(dataset: EpochIndexed, recipe, rank: int, world: int, start: int):
    """DataLoader over `dataset` following GlobalBatches from micro-batch `start`."""
    from samed2_kit.medbank.dataset import collate_clips

    sampler = GlobalBatches(
        len(dataset), recipe.train.batch_size, recipe.train.seed, rank, world, start
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_clips,
        num_workers=recipe.data.num_workers,
        # its own generator: making an iterator must not draw from the global RNG, which a
        # resumed run restores and dropout uses
        generator=torch.Generator().manual_seed(recipe.train.seed),
    )
