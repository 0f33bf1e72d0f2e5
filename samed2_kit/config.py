"""Recipes: YAML validated into typed dataclasses, with `key=value` overrides.

Unknown keys are errors that name the key, the file and the nearest valid key.

    recipe = load_recipe("recipes/quickstart.yaml", ["train.steps=50", "model.image_size=512"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samed2_kit.adapters.lora import LoraSpec
from samed2_kit.adapters.temporal import TemporalAdapterConfig
from samed2_kit.losses import LossConfig
from samed2_kit.memory.bank import MemoryConfig
from samed2_kit.prompts import PromptConfig
from samed2_kit.sources.registry import SourcesConfig


@dataclass
class ModelConfig:
    variant: str = "test-tiny"  # tiny | small | base_plus | large | test-tiny
    image_size: int = 256  # px, multiple of 32
    checkpoint: str | None = None  # Meta/MedSAM2 .pt or our .safetensors to start from


@dataclass
class DataConfig:
    """Training data: a medbank store (built from `spec` when it is missing or out of date)."""

    spec: str | None = None  # medbank build spec (YAML); relative paths: to the recipe file
    store: str | None = None  # store folder (default: "<out_dir>-store" next to the run folder)
    train_split: str = "train"
    tasks: list[str] | None = None  # restrict training and evaluation to these tasks
    clip_len: int = 1  # T adjacent slices per sample (1 for 2D)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    augment: bool = True
    num_workers: int = 0
    # few-shot episodes: each training sample comes with a support (same task, another case),
    # for the hard_prototypes source (`engine.episodes`); clip_len must be 1
    episodes: bool = False


@dataclass
class AdaptersConfig:
    """Adapters injected before training (None = not used)."""

    temporal: TemporalAdapterConfig | None = None  # mixes T adjacent slices in the Hiera blocks
    lora: LoraSpec | None = None  # peft LoRA by preset: encoder-attn | decoder-attn | all-linear


@dataclass
class TrainConfig:
    mode: str = "full"  # full: encoder + decoder train | decoder: image encoder frozen
    # what trains, by group (image_encoder, prompt_encoder, mask_decoder, temporal_adapter, lora,
    # prompt_sources, memory, all) or parameter-name regex; overrides `mode` when given
    trainable: list[str] | None = None
    lr_mult: dict[str, float] = field(default_factory=dict)  # e.g. {temporal_adapter: 10}
    steps: int = 200  # optimizer steps
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_accum: int = 1
    clip_grad: float = 1.0  # max grad norm; 0 disables
    mixed_precision: str = "auto"  # auto (bf16 where the device has it) | bf16 | no
    multimask: bool = False  # train on the best of 3 masks (SAM 2's rule for ambiguous prompts)
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # checkpoint every N optimizer steps (and at the end); 0: none
    keep_last: int = 3  # checkpoints kept (the newest K)
    val_every: int = 0  # validation Dice per task on `val_split` every N steps (and at the end)
    val_split: str = "val"
    val_max_items: int = 32  # validation items per task (the first N of the split)
    tensorboard: bool = True  # event files in RUN/tensorboard (Accelerate's tracker)

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("save_every", "val_every", "warmup_steps", "val_max_items"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0 (0: off)")


EVAL_PROTOCOLS = ("box", "point", "box+clicks", "support")
MAX_EVAL_CLICKS = 20


@dataclass
class EvalConfig:
    """Evaluation protocol (`samed2_kit.engine.evaluate`); values are checked on construction."""

    # box | point | box+clicks (box, then corrective clicks from the errors) | support (few-shot:
    # no prompt, the task's support examples only; needs the hard_prototypes source)
    prompt: str = "box"
    clicks: int = 5  # corrective clicks after the box for box+clicks (0..20)
    nsd_tolerance_mm: float = 2.0  # NSD tolerance in mm for modalities not listed below
    nsd_tolerance_by_modality: dict[str, float] = field(default_factory=dict)  # {ct: 1.0, us: 2.0}
    split: str = "test"
    max_items: int | None = None  # at most this many items per task (the first, in store order)
    # few-shot models: support examples per task, the first of the training split (by case)
    supports: int = 1

    def __post_init__(self):
        if self.prompt not in EVAL_PROTOCOLS:
            raise ValueError(
                f"eval.prompt={self.prompt!r} is not a protocol: set it to one of "
                f"{', '.join(EVAL_PROTOCOLS)}"
            )
        if isinstance(self.clicks, bool) or not (
            isinstance(self.clicks, int) and 0 <= self.clicks <= MAX_EVAL_CLICKS
        ):
            raise ValueError(
                f"eval.clicks={self.clicks!r} is out of range: set an integer in 0..{MAX_EVAL_CLICKS}"
            )
        tolerances = {"eval.nsd_tolerance_mm": self.nsd_tolerance_mm} | {
            f"eval.nsd_tolerance_by_modality.{m}": t
            for m, t in self.nsd_tolerance_by_modality.items()
        }
        for key, tol in tolerances.items():
            if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1e9:
                raise ValueError(f"{key}={tol!r} is not a tolerance: set a number of mm >= 0")
        if (
            isinstance(self.supports, bool)
            or not isinstance(self.supports, int)
            or self.supports < 1
        ):
            raise ValueError(f"eval.supports={self.supports!r}: set an integer >= 1")
        n = self.max_items
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"eval.max_items={self.max_items!r}: set an integer >= 1, or null for all items"
            )

    def nsd_tolerance(self, modality: str) -> float:
        """NSD tolerance in mm for `modality` (its own entry, else the default)."""
        return float(self.nsd_tolerance_by_modality.get(modality, self.nsd_tolerance_mm))


@dataclass
class StageConfig:
    """One stage of continual training: train on `tasks` for `steps` optimizer steps."""

    name: str
    tasks: list[str]
    steps: int = 200
    replay: int = 0  # training examples of the earlier stages' tasks kept and mixed in (seeded)
    lr: float | None = None  # default: train.lr
    # a LoRA set of this name (adapters.lora's spec) is added for the stage and is all that trains
    # (plus `trainable` groups); evaluation of the stage's tasks switches to it
    adapter: str | None = None
    trainable: list[str] | None = None  # default: train.trainable / train.mode (no adapter)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"continual stage {self.name!r} needs at least one task")
        if self.steps < 1 or self.replay < 0:
            raise ValueError(f"continual stage {self.name!r}: steps >= 1 and replay >= 0")


@dataclass
class ContinualConfig:
    """Stages trained one after the other (modalities A, then B, ...); after each, every stage's
    tasks are evaluated, giving forgetting (Dice drop on earlier tasks) and gain (on new ones)."""

    stages: list[StageConfig] = field(default_factory=list)
    replay: int | None = None  # when set, replaces every stage's `replay` (e.g. 0: no replay)


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig | None = None  # confidence memory (SAMed-2); None: no memory
    sources: SourcesConfig = field(default_factory=SourcesConfig)  # prompt sources (off)
    continual: ContinualConfig | None = None  # stages trained one after the other
    out_dir: str = "runs/quickstart"


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp, True
    return tp, False


def _coerce(value: Any, tp, where: str, source: str):
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} in {source} must not be empty")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, source)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(f"{where} in {source} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} in {source} must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if kt is int and isinstance(k, str) and k.strip().lstrip("-").isdigit():
                k = int(k)  # JSON-style "1": name
            out[_coerce(k, kt, f"{where} key {k!r}", source)] = _coerce(
                v, vt, f"{where}.{k}", source
            )
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} in {source} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} in {source} must be a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ValueError(f"{where} in {source} must be an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/yes as a bool: give the word back
            return "yes" if value else "no"
        return str(value)
    return value


def from_dict(cls, data: dict | None, where: str = "", source: str = "<recipe>"):
    """Build dataclass `cls` from a mapping; unknown keys are a ValueError naming the nearest."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'recipe'} in {source} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"unknown key '{full}' in {source}{hint} (valid: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full, source)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when `path` is None) and apply overrides."""
    import yaml

    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from e
    apply_overrides(data, overrides or [])
    recipe = from_dict(Recipe, data, "", source if not overrides else f"{source} (+ overrides)")
    spec = recipe.data.spec
    if (
        path is not None
        and spec
        and not Path(spec).is_absolute()
        and (path.parent / spec).is_file()
    ):
        recipe.data.spec = str((path.parent / spec).resolve())
    return recipe


def to_dict(obj) -> dict:
    """A recipe (or any dataclass) as plain JSON-able data."""
    return dataclasses.asdict(obj)
