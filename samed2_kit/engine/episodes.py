"""Few-shot episodes for training prompt sources that read a support example (1-way 1-shot).

Item i of `Episodes(base)` is the query `base[i]` plus one support: an image and mask of the same
task from *another case*, with a non-empty mask, drawn per (seed, epoch, i) so episodes change
every epoch and resume exactly. The support is augmented like any training item (its own draw).
"""

from __future__ import annotations

import numpy as np

from samed2_kit.engine.data import DatasetView


class Episodes(DatasetView):
    """Queries of `base` (a StoreDataset with clip_len 1), each with a support.

    Adds `support_image` (3, S, S), `support_mask` (1, S, S) and `support_id` to base's items.
    """

    def __init__(self, base, seed: int = 0) -> None:
        if base.clip_len != 1:
            raise ValueError(
                f"few-shot episodes use single slices, but data.clip_len={base.clip_len}: set "
                "data.clip_len=1 (or data.episodes=false)"
            )
        super().__init__(base)
        self.seed = int(seed)
        tasks = np.asarray(base.column("task"), dtype=object)
        cases = np.asarray(base.column("case_id"), dtype=object)
        area = np.asarray(base.column("mask_area"), dtype=np.int64)
        self._candidates = []
        for task, case in zip(tasks, cases, strict=True):
            pick = np.nonzero((tasks == task) & (cases != case) & (area > 0))[0]
            if not len(pick):
                raise ValueError(
                    f"few-shot episodes need supports from another case of the same task, but "
                    f"task {task!r} has one case with a non-empty mask in split {base.split!r} "
                    f"of {base.store_dir}: add cases of it, or drop it from data.tasks"
                )
            self._candidates.append(pick)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        pick = self._candidates[i]
        order = np.random.default_rng([self.seed, self.base.epoch, i, 2]).permutation(pick)
        for j in order:  # the first whose augmented mask is neither empty nor everything
            sup = self.base[int(j)]
            mask = sup["mask"][0]
            if 0 < float(mask.sum()) < mask.numel():
                return {**item, "support_image": sup["image"][0], "support_mask": mask,
                        "support_id": sup["sample_id"]}  # fmt: skip
        raise ValueError(
            f"query {item['sample_id']}: no support of task {item['task']} has a usable mask "
            "after augmentation (empty or all foreground): check the store's masks"
        )
