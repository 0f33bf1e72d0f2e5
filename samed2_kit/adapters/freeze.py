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

from samed2_kit import registry


def adapter_pattern() -> str:
    """Regex matching the parameters of every registered adapter kind: kept out of the groups of
    SAM 2's own modules, saved in adapter files."""
    return "|".join(f"(?:{k.pattern})" for k in registry.adapter_kinds())


def groups() -> dict[str, str]:
    """Group name -> regex (re.search) over full parameter names of a SAMed2Model: SAM 2's own
    modules (adapter parameters inside them excluded), one group per adapter kind, the prompt
    sources, the memory, and `all`."""
    not_adapter = rf"(?!.*(?:{adapter_pattern()}))"
    out = {
        "image_encoder": rf"^sam\.(?:image_encoder\.{not_adapter}|no_mem_embed$)",
        "prompt_encoder": r"^sam\.sam_prompt_encoder\.",
        "mask_decoder": rf"^sam\.sam_mask_decoder\.{not_adapter}",
    }
    out.update({k.group_name: k.pattern for k in registry.adapter_kinds()})
    out["prompt_sources"] = SOURCES_GROUP
    out["propagation"] = PROPAGATION_GROUP
    out["memory"] = MEMORY_GROUP
    out["all"] = r"."
    return out


SOURCES_GROUP = r"^(?:prompt_sources|source_gates)\."
# SAM 2's propagation path: memory attention, memory encoder, object pointers and their
# embeddings (what sequence training and volume propagation run)
PROPAGATION_GROUP = (
    r"^sam\.(?:memory_attention\.|memory_encoder\.|maskmem_tpos_enc$|no_obj_embed_spatial$"
    r"|obj_ptr_proj\.|obj_ptr_tpos_proj\.|no_obj_ptr$)"
)
# the confidence memory reads through sam2's memory attention and writes through its memory
# encoder: they train with it
MEMORY_GROUP = rf"^memory\.|{PROPAGATION_GROUP}"

# train.mode of a recipe -> the groups it trains (plus the adapter, source and memory groups the
# model has: `optional_groups`)
MODE_GROUPS: dict[str, list[str]] = {
    "full": ["image_encoder", "prompt_encoder", "mask_decoder"],
    "decoder": ["prompt_encoder", "mask_decoder"],
}


def optional_groups() -> list[str]:
    """Groups that train in every `train.mode` when the model has them."""
    return [k.group_name for k in registry.adapter_kinds()] + ["prompt_sources", "memory"]


@dataclass
class FreezePolicy:
    """train: group names (`groups()`) or regexes over parameter names; lr_mult: group name or regex
    -> learning-rate multiplier (first matching entry wins; default 1.0)."""

    train: list[str]
    lr_mult: dict[str, float] = field(default_factory=dict)


def _regex(entry: str, where: str) -> re.Pattern:
    named = groups()
    try:
        return re.compile(named.get(entry, entry))
    except re.error as e:
        raise ValueError(
            f"{where} entry {entry!r} is neither a group {sorted(named)} nor a valid regex: {e}"
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
    extra = [g for g in optional_groups() if matching(model, g)]
    if getattr(model, "memory", None) is None and "memory" in extra:
        extra.remove("memory")  # sam2's memory modules sit unused without our memory
    return FreezePolicy(train=MODE_GROUPS[mode] + extra, lr_mult=dict(lr_mult or {}))


def apply_policy(model: nn.Module, policy: FreezePolicy) -> list[dict]:
    """Set `requires_grad` by the policy; return optimizer parameter groups, one per multiplier:
    `{"params": [...], "lr_mult": m, "name": "<entries>"}` (each trainable parameter once)."""
    if not policy.train:
        raise ValueError(
            f"freeze policy trains nothing: list groups in train, e.g. {sorted(groups())}"
        )
    named = list(model.named_parameters())
    trainable: set[str] = set()
    for entry in policy.train:
        regex = _regex(entry, "train")
        hits = {n for n, _ in named if regex.search(n)}
        if not hits:
            raise ValueError(
                f"train entry {entry!r} matches no parameter of the model: use a group "
                f"{sorted(groups())} (adapters must be injected first) or a regex over "
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
    by_mult: dict[float, dict] = {}
    used: set[str] = set()
    for name, p in named:
        p.requires_grad_(name in trainable)
        if name not in trainable:
            continue
        entry, mult = next(((e, m) for e, r, m in mults if r.search(name)), ("default", 1.0))
        group = by_mult.setdefault(mult, {"params": [], "lr_mult": mult, "name": []})
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
    for group in by_mult.values():
        group["name"] = "+".join(group["name"])
    return list(by_mult.values())


def _table_rows() -> list[tuple[str, str]]:
    """Rows of trainable_table: label -> regex over parameter names (first match wins)."""
    kinds = [(k.label or k.name, k.pattern) for k in registry.adapter_kinds()]
    return kinds + [
        ("sam.image_encoder", r"^sam\.image_encoder\."),
        ("sam.sam_prompt_encoder", r"^sam\.sam_prompt_encoder\."),
        ("sam.sam_mask_decoder", r"^sam\.sam_mask_decoder\."),
        ("prompt sources", SOURCES_GROUP),
        ("memory (ours)", MEMORY_GROUP),
        ("others", r"."),
    ]


def trainable_table(model: nn.Module) -> str:
    """A table of trainable vs total parameters by top-level module, with totals."""
    table = _table_rows()
    rows = {label: [0, 0] for label, _ in table}
    compiled = [(label, re.compile(rx)) for label, rx in table]
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
