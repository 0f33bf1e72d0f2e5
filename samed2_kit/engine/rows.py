"""Evaluation rows: one per evaluated sample (a 2D image or a volume), and item selection."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CaseRow:
    """One evaluated sample. hd95 in `unit` (mm; px for data without a pixel size);
    click_dice: Dice after the box and after each corrective click (box+clicks and
    slice-box+clicks only, else empty); dice_auc: its normalised area (else nan)."""

    sample_id: str
    case_id: str
    task: str
    label: str
    modality: str
    dice: float
    nsd: float
    hd95: float
    box_dice: float
    box_nsd: float
    box_hd95: float
    click_dice: list[float] = field(default_factory=list)
    dice_auc: float = float("nan")
    unit: str = "mm"  # of hd95 and the NSD tolerance: "px" where the data gave no pixel size


def limit_per_task(items: list, max_items: int | None) -> list:
    """The first `max_items` items of each task, in input order (all when None)."""
    if max_items is None:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it.task] = seen.get(it.task, 0) + 1
        if seen[it.task] <= max_items:
            out.append(it)
    return out
