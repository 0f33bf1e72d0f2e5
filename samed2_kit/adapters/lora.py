"""LoRA (and LoHa/LoKr) on SAM 2's linear layers, through `peft.inject_adapter_in_model`.

Adapters are injected into `model.sam` (sam2's `SAM2Base`, which stays a `SAM2Base`) by a module-name
regex, matched with `re.fullmatch` against `model.sam.named_modules()` names (peft's rule for a string
`target_modules`). A wrapped Linear keeps its weight at `<name>.base_layer.weight`; the adapter adds
`<name>.lora_A.<set>.weight` and `<name>.lora_B.<set>.weight` (B zero at init: output unchanged).

Several named sets may live side by side (e.g. "ct" and "mr"); one is active at a time (the last
injected, or the one given to `set_active_lora`). Injecting or switching never changes the
`requires_grad` of existing parameters (peft's injection alone would freeze the base): trainability
is the freeze policy's job. An inactive set gets no gradient, so an optimizer leaves it untouched.
peft is imported inside the functions that need it (it is slow to import).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass

from torch import nn

from samed2_kit.registry import AdapterKind

# name -> module-name regex (fullmatch) over `model.sam.named_modules()`; every hit is an nn.Linear
# in all of Meta's SAM 2.1 variants and in test-tiny. The memory modules (memory_attention,
# memory_encoder, obj_ptr_proj) are never targeted: the image-only path does not run them.
PRESETS: dict[str, str] = {
    # Hiera attention: qkv and output projection of every block
    "encoder-attn": r"image_encoder\.trunk\.blocks\.\d+\.attn\.(qkv|proj)",
    # TwoWayTransformer attention of the mask decoder (self, both cross-attentions, final)
    "decoder-attn": r"sam_mask_decoder\.transformer\.(layers\.\d+\.)?\w+\.(q_proj|k_proj|v_proj|out_proj)",
    # every Linear of the image encoder and the mask decoder
    "all-linear": (
        r"image_encoder\.trunk\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.layers\.\d+|proj)"
        r"|sam_mask_decoder\.("
        r"transformer\.(layers\.\d+\.)?\w+\.(q_proj|k_proj|v_proj|out_proj)"
        r"|transformer\.layers\.\d+\.mlp\.layers\.\d+"
        r"|(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)\.layers\.\d+)"
    ),
}

# peft methods that work through inject_adapter_in_model on nn.Linear here (tested: identity at init,
# training changes the output, merge == unmerged). VeRA/VB-LoRA keep shared state on the tuner and
# are refused by inject_adapter_in_model.
METHODS: tuple[str, ...] = ("lora", "loha", "lokr")

# Parameter names of peft adapters (any method above), for freeze groups and adapter checkpoints.
PEFT_PARAM_PATTERN = r"\.(?:lora_|hada_|lokr_)"

_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class LoraSpec:
    """preset: a PRESETS name or a module-name regex (fullmatch over `model.sam` modules);
    rank r; alpha (scaling = alpha / rank for LoRA); dropout on the adapter input (LoRA) or on
    the rank (LoHa/LoKr); method: one of METHODS."""

    preset: str = "encoder-attn"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    method: str = "lora"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"lora.method={self.method!r}: choose one of {list(METHODS)}")
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: use a positive integer, e.g. 8")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: use a value in [0, 1)")

    @property
    def pattern(self) -> str:
        return PRESETS.get(self.preset, self.preset)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"adapter name {name!r}: use letters, digits, '_' or '-' (e.g. 'default', 'ct')"
        )
    return name


def target_modules(model: nn.Module, preset: str) -> list[str]:
    """Names of the `model.sam` modules a preset (or regex) targets; all must be nn.Linear."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pattern = PRESETS.get(preset, preset)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"lora preset {preset!r} is neither a preset {sorted(PRESETS)} nor a valid regex: {e}"
        ) from e
    hits, bad = [], []
    for name, module in model.sam.named_modules():
        if not regex.fullmatch(name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        (hits if type(base) is nn.Linear else bad).append(name)
    if bad:
        raise ValueError(
            f"lora preset {preset!r} matches modules that are not nn.Linear: {bad[:5]}; "
            "narrow the regex to Linear layers (see model.sam.named_modules())"
        )
    if not hits:
        raise ValueError(
            f"lora preset {preset!r} matches no module of model.sam: use one of "
            f"{sorted(PRESETS)} or a regex over model.sam.named_modules() names (fullmatch)"
        )
    return hits


def peft_config(spec: LoraSpec):
    """The peft config of a spec (LoraConfig, LoHaConfig or LoKrConfig)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kw = {"r": spec.rank, "target_modules": spec.pattern}
    if spec.method == "lora":
        return LoraConfig(lora_alpha=spec.alpha, lora_dropout=spec.dropout, **kw)
    cls = LoHaConfig if spec.method == "loha" else LoKrConfig
    return cls(alpha=spec.alpha, rank_dropout=spec.dropout, **kw)


def lora_sets(model: nn.Module) -> list[str]:
    """Names of the adapter sets injected into `model.sam` (sorted)."""
    return sorted(getattr(model.sam, "peft_config", {}) or {})


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    if not lora_sets(model):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.sam.modules() if isinstance(m, BaseTunerLayer)]


def inject_lora(
    model: nn.Module, spec: LoraSpec | None = None, adapter_name: str = "default"
) -> int:
    """Wrap the Linear layers of `spec.preset` in `model.sam` with adapter set `adapter_name`.

    The new set becomes the active one. Returns the number of wrapped modules.
    """
    from peft import inject_adapter_in_model

    spec = spec or LoraSpec()
    check_name(adapter_name)
    if adapter_name in lora_sets(model):
        raise ValueError(
            f"model already has an adapter set {adapter_name!r}: pick another adapter_name "
            f"(present: {lora_sets(model)})"
        )
    if is_merged(model):
        raise ValueError("LoRA is merged into the weights: unmerge_lora(model) before injecting")
    hits = target_modules(model, spec.preset)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    with warnings.catch_warnings():  # peft warns whenever a second set is added: expected here
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        inject_adapter_in_model(peft_config(spec), model.sam, adapter_name=adapter_name)
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))
    return len(hits)


def lora_spec(model: nn.Module, adapter_name: str) -> LoraSpec:
    """The LoraSpec of an injected set, rebuilt from its peft config."""
    configs = getattr(model.sam, "peft_config", {}) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"no adapter set {adapter_name!r} in the model (present: {lora_sets(model)})"
        )
    cfg = configs[adapter_name]
    method = str(getattr(cfg.peft_type, "value", cfg.peft_type)).lower()
    if method not in METHODS:
        raise ValueError(f"adapter set {adapter_name!r} is {method}: only {METHODS} are supported")
    target = cfg.target_modules
    if not isinstance(target, str):
        raise ValueError(f"adapter set {adapter_name!r}: target_modules must be one regex string")
    preset = next((k for k, v in PRESETS.items() if v == target), target)
    if method == "lora":
        return LoraSpec(preset, cfg.r, float(cfg.lora_alpha), float(cfg.lora_dropout), method)
    return LoraSpec(preset, cfg.r, float(cfg.alpha), float(cfg.rank_dropout), method)


def active_lora(model: nn.Module) -> str | None:
    """The active adapter set (None when none is injected)."""
    for layer in _tuner_layers(model):
        active = layer.active_adapters
        return active[0] if active else None
    return None


def set_active_lora(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the set used in the forward. A merged model is unmerged, switched and
    merged again. `requires_grad` flags are left as they are (the freeze policy decides)."""
    if adapter_name not in lora_sets(model):
        raise ValueError(
            f"no adapter set {adapter_name!r} in the model (present: {lora_sets(model)}): "
            "inject_lora(model, spec, adapter_name=...) or load_adapters(...) first"
        )
    was_merged = is_merged(model)
    if was_merged:
        unmerge_lora(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for layer in _tuner_layers(model):
        layer.set_adapter(adapter_name)
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    if was_merged:
        merge_lora(model)


def merge_lora(model: nn.Module) -> int:
    """Add the active set's update into the base weights (fast inference: no adapter compute).
    Returns the number of merged layers; `unmerge_lora` restores the base weights."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA adapters to merge: inject_lora or load_adapters first"
        )
    n = 0
    for layer in layers:
        if not layer.merged:
            layer.merge()  # merges the active set where this layer has it
            n += int(layer.merged)
    return n


def unmerge_lora(model: nn.Module) -> int:
    """Subtract merged adapter updates from the base weights; returns the number of layers."""
    n = 0
    for layer in _tuner_layers(model):
        if layer.merged:
            layer.unmerge()
            n += 1
    return n


def is_merged(model: nn.Module) -> bool:
    """True when some adapter update is merged into the base weights."""
    return any(m.merged for m in _tuner_layers(model))


def _jsonable(obj):
    return json.loads(
        json.dumps(obj, default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    )


def describe_lora(model: nn.Module) -> dict | None:
    """Every injected set (its spec and peft config) and the active one (None: no set)."""
    sets = {
        name: {
            "spec": dataclasses.asdict(lora_spec(model, name)),
            "peft_config": _jsonable(model.sam.peft_config[name].to_dict()),
        }
        for name in lora_sets(model)
    }
    return {"sets": sets, "active": active_lora(model)} if sets else None


def restore_lora(model: nn.Module, saved: dict) -> list[str]:
    """Inject the sets of `describe_lora`'s output that the model lacks, activate the saved
    active set; returns the names injected."""
    injected = []
    for name, entry in (saved.get("sets") or {}).items():
        if name not in lora_sets(model):
            inject_lora(model, LoraSpec(**entry["spec"]), adapter_name=name)
            injected.append(name)
    if saved.get("active") in lora_sets(model):
        set_active_lora(model, saved["active"])
    return injected


KIND = AdapterKind(
    name="lora",
    config=LoraSpec,
    inject=lambda model, spec: inject_lora(model, spec),
    pattern=PEFT_PARAM_PATTERN,
    label="LoRA (peft)",
    describe=describe_lora,
    restore=restore_lora,
)
