"""Trainable-parameter policy: which parameters train, and at which learning-rate multiplier.

A recipe names groups or regexes over `model.named_parameters()` names (full names, e.g.
`sam.image_encoder.trunk.blocks.0.attn.qkv.lora_A.default.weight`):

    policy = FreezePolicy(train=["lora", "mask_decoder"], lr_mult={"lora": 10.0})
    groups = apply_policy(model, policy)      # [{"params": [...], "lr_mult": 10.0, "name": "lora"}, ...]
    opt = torch.optim.AdamW([{**g, "lr": base_lr * g["lr_mult"]} for g in groups])

The groups of SAM 2's own modules exclude adapter parameters living inside them (LoRA, temporal
adapters): `image_encoder` is the base encoder (plus `no_mem_embed`, added to its output on the
image-only path), `lora` every peft adapter (LoRA/LoHa/LoKr, all sets), `all` every parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from samed2_kit.adapters.lora import PEFT_PARAM_PATTERN

TEMPORAL_PATTERN = r"\.temporal_adapter\."
# Adapter parameters (any kind): excluded from the groups of SAM 2's own modules.
ADAPTER_PATTERN = rf"{TEMPORAL_PATTERN}|{PEFT_PARAM_PATTERN}"
_NOT_ADAPTER = rf"(?!.*(?:{ADAPTER_PATTERN}))"

# group name -> regex (re.search) over full parameter names of a SAMed2Model
GROUPS: dict[str, str] = {
    "image_encoder": rf"^sam\.(?:image_encoder\.{_NOT_ADAPTER}|no_mem_embed$)",
    "prompt_encoder": r"^sam\.sam_prompt_encoder\.",
    "mask_decoder": rf"^sam\.sam_mask_decoder\.{_NOT_ADAPTER}",
    "temporal_adapter": TEMPORAL_PATTERN,
    "lora": PEFT_PARAM_PATTERN,
    "prompt_sources": r"^(?:prompt_sources|source_gates)\.",
    # the confidence memory reads through sam2's memory attention and writes through its memory
    # encoder: they train with it
    "memory": r"^(?:memory\.|sam\.(?:memory_attention|memory_encoder)\.|sam\.maskmem_tpos_enc$"
    r"|sam\.no_obj_embed_spatial$)",
    "all": r".",
}

# train.mode of a recipe -> the groups it trains (plus whichever of OPTIONAL_GROUPS the model has)
MODE_GROUPS: dict[str, list[str]] = {
    "full": ["image_encoder", "prompt_encoder", "mask_decoder"],
    "decoder": ["prompt_encoder", "mask_decoder"],
}
OPTIONAL_GROUPS = ["temporal_adapter", "lora", "prompt_sources", "memory"]


@dataclass
class FreezePolicy:
    """train: group names (GROUPS) or regexes over parameter names; lr_mult: group name or regex
    -> learning-rate multiplier (first matching entry wins; default 1.0)."""

    train: list[str]
    lr_mult: dict[str, float] = field(default_factory=dict)


def _regex(entry: str, where: str) -> re.Pattern:
    try:
        return re.compile(GROUPS.get(entry, entry))
    except re.error as e:
        raise ValueError(
            f"{where} entry {entry!r} is neither a group {sorted(GROUPS)} nor a valid regex: {e}"
        ) from e


def matching(model: nn.Module, entry: str) -> list[str]:
    """Parameter names of `model` that a group name or regex selects."""
    regex = _regex(entry, "policy")
    return [n for n, _ in model.named_parameters() if regex.search(n)]


def policy_for_mode(model: nn.Module, mode: str, lr_mult: dict[str, float] | None = None):
    """The FreezePolicy of a recipe's `train.mode`: its SAM 2 groups plus the adapters, prompt
    sources and memory the model has."""
    if mode not in MODE_GROUPS:
        raise ValueError(f"train.mode={mode!r}: choose one of {sorted(MODE_GROUPS)}")
    extra = [g for g in OPTIONAL_GROUPS if matching(model, g)]
    if getattr(model, "memory", None) is None and "memory" in extra:
        extra.remove("memory")  # sam2's memory modules sit unused without our memory
    return FreezePolicy(train=MODE_GROUPS[mode] + extra, lr_mult=dict(lr_mult or {}))


def apply_policy(model: nn.Module, policy: FreezePolicy) -> list[dict]:
    """Set `requires_grad` by the policy; return optimizer parameter groups, one per multiplier:
    `{"params": [...], "lr_mult": m, "name": "<entries>"}` (each trainable parameter once)."""
    if not policy.train:
        raise ValueError(
            f"freeze policy trains nothing: list groups in train, e.g. {sorted(GROUPS)}"
        )
    named = list(model.named_parameters())
    trainable: set[str] = set()
    for entry in policy.train:
        regex = _regex(entry, "train")
        hits = {n for n, _ in named if regex.search(n)}
        if not hits:
            raise ValueError(
                f"train entry {entry!r} matches no parameter of the model: use a group "
                f"{sorted(GROUPS)} (adapters must be injected first) or a regex over "
                "model.named_parameters() names, e.g. 'sam_mask_decoder\\.iou_prediction_head'"
            )
        trainable |= hits
    mults = []
    for entry, mult in policy.lr_mult.items():
        if not mult > 0:
            raise ValueError(
                f"lr_mult[{entry!r}]={mult}: use a positive multiplier (to freeze, leave it out of train)"
            )
        mults.append((entry, _regex(entry, "lr_mult"), float(mult)))
    groups: dict[float, dict] = {}
    used: set[str] = set()
    for name, p in named:
        p.requires_grad_(name in trainable)
        if name not in trainable:
            continue
        entry, mult = next(((e, m) for e, r, m in mults if r.search(name)), ("default", 1.0))
        group = groups.setdefault(mult, {"params": [], "lr_mult": mult, "name": []})
        group["params"].append(p)
        if entry not in group["name"]:
            group["name"].append(entry)
        used.add(entry)
    unused = [e for e, _, _ in mults if e not in used]
    if unused:
        raise ValueError(
            f"lr_mult entries {unused} match no trainable parameter (an earlier entry may take "
            f"them, or they are frozen): trainable groups are set by train={policy.train}"
        )
    for group in groups.values():
        group["name"] = "+".join(group["name"])
    return list(groups.values())


# rows of trainable_table: label -> regex over parameter names (first match wins)
_TABLE_ROWS: list[tuple[str, str]] = [
    ("temporal adapters", TEMPORAL_PATTERN),
    ("LoRA (peft)", PEFT_PARAM_PATTERN),
    ("sam.image_encoder", r"^sam\.image_encoder\."),
    ("sam.sam_prompt_encoder", r"^sam\.sam_prompt_encoder\."),
    ("sam.sam_mask_decoder", r"^sam\.sam_mask_decoder\."),
    ("prompt sources", GROUPS["prompt_sources"]),
    ("memory (ours)", GROUPS["memory"]),
    ("others", r"."),
]


def trainable_table(model: nn.Module) -> str:
    """A table of trainable vs total parameters by top-level module, with totals."""
    rows = {label: [0, 0] for label, _ in _TABLE_ROWS}
    compiled = [(label, re.compile(rx)) for label, rx in _TABLE_ROWS]
    for name, p in model.named_parameters():
        label = next(lb for lb, rx in compiled if rx.search(name))
        rows[label][1] += p.numel()
        rows[label][0] += p.numel() if p.requires_grad else 0
    lines = [f"{'module':<24} {'trainable':>12} {'total':>12} {'%':>7}"]
    for label, (train, total) in rows.items():
        if total:
            lines.append(f"{label:<24} {train:>12,} {total:>12,} {100.0 * train / total:>6.1f}%")
    train = sum(r[0] for r in rows.values())
    total = sum(r[1] for r in rows.values())
    share = 100.0 * train / total if total else 0.0
    lines.append(f"{'total':<24} {train:>12,} {total:>12,} {share:>6.1f}%")
    return "\n".join(lines)
