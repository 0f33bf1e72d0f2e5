"""Recipes: YAML validated into typed dataclasses, with `key=value` overrides.

Unknown keys are errors that name the key, the file and the nearest valid key.

    recipe = load_recipe("recipes/quickstart.yaml", ["train.steps=50", "model.image_size=512"])

This module imports no torch: the CLI parser reads its constants. The `adapters:` and `sources:`
sections are mappings from a registered kind's name to its config (`samed2_kit.registry`);
their config classes are imported when a recipe is read. `docs/recipe-reference.md` lists every
key (`python scripts/recipe_reference.py` writes it from these dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samed2_kit import registry
from samed2_kit.prompts import PromptConfig
from samed2_kit.utils.dataconf import apply_overrides, from_dict, to_dict

__all__ = [
    "EVAL_PROTOCOLS", "PREDICT_FORMATS", "ClicksConfig", "ContinualConfig", "DataConfig", "EvalConfig", "LossConfig",
    "MemoryConfig", "ModelConfig", "Recipe", "StageConfig", "TrainConfig", "apply_overrides",
    "from_dict", "load_recipe", "to_dict",
]  # fmt: skip


VARIANT_NAMES = ("tiny", "small", "base_plus", "large", "test-tiny")  # `model.build.VARIANTS`


@dataclass
class ModelConfig:
    variant: str = "test-tiny"  # tiny | small | base_plus | large | test-tiny
    image_size: int = 256  # px, multiple of 32
    checkpoint: str | None = None  # Meta/MedSAM2 .pt or our .safetensors to start from

    def __post_init__(self) -> None:
        if self.variant not in VARIANT_NAMES:
            raise ValueError(
                f"model.variant={self.variant!r}: choose one of {', '.join(VARIANT_NAMES)}"
            )
        n = self.image_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 32 or n % 32:
            near = max(32, 32 * round(n / 32)) if isinstance(n, int | float) else 256
            raise ValueError(f"model.image_size={n!r}: give a multiple of 32 px, e.g. {near}")


@dataclass
class DataConfig:
    """Training data: a medbank store (built from `spec` when it is missing or out of date)."""

    spec: str | None = None  # medbank build spec (YAML); relative paths: to the recipe file
    store: str | None = None  # store folder (default: "<out_dir>-store" next to the run folder)
    train_split: str = "train"
    tasks: list[str] | None = None  # restrict training and evaluation to these tasks
    clip_len: int = 1  # T adjacent slices per sample (1 for 2D): the encoder's clips
    # train.step=sequence: N consecutive slices per sample (a multiple of clip_len; the store's
    # clip_radius R must allow it: N <= 2R + 1)
    sequence_len: int = 5
    prompt: PromptConfig = field(default_factory=PromptConfig)
    augment: bool = True
    num_workers: int = 0
    # few-shot episodes: each training sample comes with a support (same task, another case),
    # for the hard_prototypes source (`engine.episodes`); clip_len must be 1
    episodes: bool = False


TRAIN_STEPS = ("image", "sequence")  # `samed2_kit.engine.steps.STEPS`


@dataclass
class ClicksConfig:
    """Simulated corrective clicks while training (`samed2_kit.engine.clicks`), as SAM 2's
    trainer does: after the prediction, a sample (with probability `prob`, drawn per sample) gets
    `rounds` more decoder passes, each adding one click sampled from its error region (a false
    negative pixel: positive; a false positive: negative) and taking the previous logits as mask
    input. train.step=sequence corrects the prompted slice, before propagation starts from it."""

    prob: float = 0.0  # probability that a sample gets corrective rounds (0: off)
    rounds: int = 3  # corrective clicks (decoder passes) per corrected sample, 1..20

    def __post_init__(self) -> None:
        p = self.prob
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ValueError(f"train.clicks.prob={p!r}: set a probability in [0, 1] (0: off)")
        r = self.rounds
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_EVAL_CLICKS:
            raise ValueError(f"train.clicks.rounds={r!r}: set an integer in 1..{MAX_EVAL_CLICKS}")


@dataclass
class TrainConfig:
    mode: str = "full"  # full: encoder + decoder train | decoder: image encoder frozen
    # image: each image (or clip of T slices) decoded with its prompt | sequence: runs of
    # data.sequence_len slices, the centre prompted, the rest propagated through SAM 2's memory path
    # (its memory attention and memory encoder then train too: freeze group `propagation`)
    step: str = "image"
    memory_frames: int = 6  # sequence: recent results each propagated slice attends to
    clicks: ClicksConfig = field(default_factory=ClicksConfig)  # simulated corrective clicks
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
        if self.step not in TRAIN_STEPS:
            raise ValueError(f"train.step={self.step!r}: choose one of {', '.join(TRAIN_STEPS)}")
        if self.memory_frames < 0:
            raise ValueError(f"train.memory_frames={self.memory_frames} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"train.lr={self.lr}: the learning rate must be > 0, e.g. 3e-4")
        for key in ("weight_decay", "clip_grad"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0 (0: off)")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("save_every", "val_every", "warmup_steps", "val_max_items"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= 0 (0: off)")


# 2D: box, point, box+clicks, support; volumes (`engine.volumes.VOLUME_PROTOCOLS`): the rest
EVAL_PROTOCOLS = ("box", "point", "box+clicks", "support", "slice-box", "slice-box+clicks",
                  "box-per-slice")  # fmt: skip
PREDICT_FORMATS = ("auto", "png", "nifti", "dicom-seg")  # `samed2 predict --format`
MAX_EVAL_CLICKS = 20


@dataclass
class EvalConfig:
    """Evaluation protocol (`samed2_kit.engine.evaluate`); values are checked on construction."""

    # 2D: box | point | box+clicks (box, then corrective clicks from the errors) | support
    # (few-shot: no prompt, the task's support examples only; needs a source that reads supports)
    # volumes, in 3D: slice-box (key slice's box, propagated) | slice-box+clicks (then clicks in
    # 3D, re-propagated) | box-per-slice (each slice its box, no propagation)
    prompt: str = "box"
    clicks: int = 5  # corrective clicks after the box for box+clicks, slice-box+clicks (0..20)
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
class LossConfig:
    """Weights of the loss terms (>= 0; a weight of 0 skips that term).

    Attributes:
        dice_ce: MONAI ``DiceCELoss(sigmoid=True)`` (soft Dice + pixel-mean BCE) on the mask logits.
        focal: MONAI ``FocalLoss(gamma=2, alpha=0.25)`` (sigmoid, pixel mean) on the mask logits.
        iou: MSE between the predicted IoU and the real IoU of ``(logits > 0)`` vs gt.
        object_score: BCE-with-logits on the object score; target is "gt is non-empty".
        boundary: the BF1 boundary loss (`boundary_loss`, CoW's L_bound) on the chosen mask.
        source: Dice + BCE on each prompt source's own prediction (`SAMed2Output.source_logits`,
            e.g. the hard-prototype map), so the source learns directly, not only through its gate.
    """

    dice_ce: float = 1.0
    focal: float = 0.0
    iou: float = 1.0
    object_score: float = 1.0
    boundary: float = 0.0
    source: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dice_ce", "focal", "iou", "object_score", "boundary", "source"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.dice_ce + self.focal + self.iou + self.object_score == 0:
            raise ValueError(
                "LossConfig: all weights are 0; set at least one of dice_ce/focal/iou/object_score > 0."
            )


PARTITION_BY = ("task", "modality", "none")
REPLACE_RULES = ("nearest", "diversity")


@dataclass
class MemoryConfig:
    """Recipe section `memory:` (None: no memory)."""

    key_pool: int = 1  # key = image embedding average-pooled to g x g: C * g^2 values ...
    key_dim: int | None = 64  # ... projected to this many (fixed seeded Gaussian); None: keep all
    top_k: int = 4  # entries retrieved per image (independent of the batch size)
    conf_weight: float = 0.1  # lambda in score = cosine + lambda * confidence
    threshold: float = 0.8  # write only predictions at least this confident
    capacity: int = 256  # entries per partition
    capacities: dict[str, int] = field(default_factory=dict)  # per-partition overrides
    partition_by: str = "task"  # task | modality | none
    replace: str = "nearest"  # nearest (SAMed-2) | diversity (MedSAM-2)
    stability: bool = False  # confidence = predicted IoU x stability score
    read_scope: str = "all"  # all: retrieve from every partition | partition: the query's own

    def __post_init__(self) -> None:
        if self.partition_by not in PARTITION_BY:
            raise ValueError(f"memory.partition_by={self.partition_by!r}: one of {PARTITION_BY}")
        if self.replace not in REPLACE_RULES:
            raise ValueError(f"memory.replace={self.replace!r}: one of {REPLACE_RULES}")
        if self.read_scope not in ("all", "partition"):
            raise ValueError(f"memory.read_scope={self.read_scope!r}: all or partition")
        for name, value in {"capacity": self.capacity, **{f"capacities.{k}": v for k, v in
                            self.capacities.items()}}.items():  # fmt: skip
            if value < 1:
                raise ValueError(f"memory.{name}={value} must be >= 1")
        if self.top_k < 1 or self.key_pool < 1 or not 0 <= self.threshold <= 1:
            raise ValueError("memory: top_k >= 1, key_pool >= 1 and 0 <= threshold <= 1")
        if self.key_dim is not None and self.key_dim < 1:
            raise ValueError(f"memory.key_dim={self.key_dim} must be >= 1 (or null: no projection)")

    def capacity_of(self, partition: str) -> int:
        return self.capacities.get(partition, self.capacity)


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
    # {kind: config} of the adapters to inject (`samed2_kit.registry.ADAPTERS`), e.g.
    # {temporal: {rank: 32}, lora: {preset: encoder-attn}}
    adapters: dict[str, Any] = field(
        default_factory=dict, metadata={"kinds": registry.adapter_configs}
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig | None = None  # confidence memory (SAMed-2); None: no memory
    # {kind: config} of the prompt sources (`samed2_kit.registry.SOURCES`); {}: none
    sources: dict[str, Any] = field(
        default_factory=dict, metadata={"kinds": registry.source_configs}
    )
    continual: ContinualConfig | None = None  # stages trained one after the other
    out_dir: str = "runs/quickstart"


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when `path` is None) and apply overrides."""
    import yaml

    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"recipe {path} is a folder: pass the recipe's YAML file")
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"recipe {path} cannot be read as text ({e}): pass a YAML recipe "
                             "file you can read") from e  # fmt: skip
        if not isinstance(data, dict):
            raise ValueError(f"recipe {path} holds a {type(data).__name__}, not a mapping of "
                             "sections (model:, data:, train: ...): fix the file")  # fmt: skip
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
