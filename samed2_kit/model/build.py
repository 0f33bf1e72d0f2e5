"""Build SAM 2 models from sam2's own modules, and load checkpoints safely.

Variants: Meta's SAM 2.1 configs (`tiny`, `small`, `base_plus`, `large`, shipped inside the `sam2`
package) and `test-tiny` (~1.3 M parameters, ours, for tests and CI on CPU).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from samed2_kit.model.spec import ModelSpec

log = logging.getLogger(__name__)

_OURS = Path(__file__).resolve().parent.parent / "configs"

# name -> (config file, where it lives)
VARIANTS: dict[str, tuple[str, str]] = {
    "tiny": ("sam2.1/sam2.1_hiera_t.yaml", "sam2"),
    "small": ("sam2.1/sam2.1_hiera_s.yaml", "sam2"),
    "base_plus": ("sam2.1/sam2.1_hiera_b+.yaml", "sam2"),
    "large": ("sam2.1/sam2.1_hiera_l.yaml", "sam2"),
    "test-tiny": ("test-tiny.yaml", "ours"),
}

# Hiera trunk signature (patch-embed width, number of blocks) -> variant; used to name the variant a
# checkpoint was made for.
_TRUNK_SIGNATURES: dict[tuple[int, int], str] = {
    (96, 12): "tiny",
    (96, 16): "small",
    (112, 24): "base_plus",
    (144, 48): "large",
    (16, 5): "test-tiny",
}

# What sam2's own `build_sam2(..., apply_postprocessing=True)` sets: fall back to the best of the
# three masks when the single-mask output is unstable. We keep it so predictions match sam2's.
_POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


@dataclass
class LoadReport:
    """Result of loading a checkpoint: keys the model has but the file lacks, and the reverse."""

    path: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected


def _config_path(variant: str) -> Path:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {sorted(VARIANTS)}")
    rel, where = VARIANTS[variant]
    if where == "ours":
        return _OURS / rel
    import importlib.util

    spec = importlib.util.find_spec("sam2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sam2 is not installed: run `bash scripts/install.sh` (see README)")
    return Path(next(iter(spec.submodule_search_locations))) / "configs" / rel


def check_image_size(image_size, what: str = "image_size") -> int:
    """`image_size` as an int, or a ValueError naming `what`: the model's input side in px must
    be a multiple of 32 (the Hiera window grid at S/4 and the embedding at S/16) and >= 64."""
    import numbers

    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise ValueError(f"{what}={image_size!r}: give an integer number of pixels, e.g. 1024")
    if image_size % 32 or image_size < 64:
        raise ValueError(f"{what}={image_size}: use a multiple of 32, e.g. 256, 512 or 1024")
    return int(image_size)


def model_config(variant: str, image_size: int = 1024):
    """The OmegaConf config of `variant` at `image_size` (px, a multiple of 32)."""
    from omegaconf import OmegaConf

    check_image_size(image_size)
    cfg = OmegaConf.load(_config_path(variant))
    m = cfg.model
    m.image_size = image_size
    feat = image_size // 16  # RoPE grid of the memory attention = image-embedding grid
    m.memory_attention.layer.self_attention.feat_sizes = [feat, feat]
    m.memory_attention.layer.cross_attention.feat_sizes = [feat, feat]
    m.sam_mask_decoder_extra_args = dict(_POSTPROCESSING)
    return cfg


def build_sam2_module(variant: str, image_size: int = 1024) -> torch.nn.Module:
    """Instantiate sam2's `SAM2Base` for `variant` (random weights)."""
    from samed2_kit.model import _sam2

    return _sam2.instantiate(model_config(variant, image_size).model)


def build_model(
    variant: str = "test-tiny",
    checkpoint: str | Path | None = None,
    image_size: int = 1024,
    device: str | torch.device | None = None,
    strict: bool = False,
    clip_len: int = 1,
):
    """Build a `SAMed2Model` around sam2's modules, optionally loading a checkpoint.

    Args:
        variant: one of `VARIANTS`.
        checkpoint: Meta/MedSAM2 `.pt` (`{"model": state_dict}`) or our `.safetensors`.
        image_size: model input side in px (256, 512, 1024; any multiple of 32).
        device: where to put the model (default: CPU).
        strict: raise if the checkpoint lacks keys or has extra ones (else they are logged).
        clip_len: T adjacent slices per clip (`ModelSpec.clip_len`).
    """
    from samed2_kit.model.wrapper import SAMed2Model

    spec = ModelSpec(variant, image_size, clip_len)
    sam, report = build_sam2_module(variant, image_size), None
    if checkpoint is not None:
        report = load_checkpoint(sam, checkpoint, variant=variant)
        if not report.ok:
            msg = (
                f"checkpoint {report.path}: {len(report.missing)} missing keys "
                f"{report.missing[:5]}, {len(report.unexpected)} unexpected keys "
                f"{report.unexpected[:5]}"
            )
            if strict:
                raise ValueError(msg + "; pass strict=False to load what matches")
            log.warning(msg)
    return SAMed2Model(sam, spec, load_report=report).to(device or "cpu")


RUN_WEIGHTS, RUN_MANIFEST = "model.safetensors", "model.json"  # `assemble.WEIGHTS`, `MANIFEST`
CHECKPOINT_FIX = (
    "pass a SAM 2 .pt (Meta's or MedSAM2's), a .safetensors file or a run folder written by "
    "`samed2 train`"
)


def read_safetensors(
    path: str | Path, fix: str = "re-copy it or retrain", what: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, nothing unpickled. A truncated or
    damaged file is a ValueError naming `what` + the file and the `fix` (never a bare
    SafetensorError); a missing one a FileNotFoundError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}{path} does not exist: {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{what}{path} is truncated or not a safetensors file ({e}): {fix}") from e
    return tensors, meta


def verify_run_file(path: str | Path, required: bool = False) -> None:
    """Check a file of a saved run folder against the sha256 its `model.json` records
    (`files: {name: sha256}`): a mismatch is a ValueError naming both files and the fix. A file
    the manifest does not list loads unchecked; with `required`, a warning says so. A file beside
    no model.json (a plain checkpoint) is not checked."""
    import json

    from samed2_kit.utils.atomic import sha256_file

    path = Path(path)
    manifest = path.parent / RUN_MANIFEST
    if not manifest.is_file():
        return
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest} is unreadable or not valid JSON ({e}): re-copy the run "
                         "folder or retrain") from e  # fmt: skip
    digest = (meta.get("files") or {}).get(path.name) if isinstance(meta, dict) else None
    if digest is None:
        if required:
            log.warning("%s records no sha256 of %s: it loads unverified (save the model again "
                        "to record one)", manifest, path.name)  # fmt: skip
        return
    if sha256_file(path) != digest:
        raise ValueError(f"{path} does not match {manifest} (sha256 differs): the file is "
                         "damaged or was replaced; re-copy the run folder or retrain")  # fmt: skip


def checkpoint_file(path: str | Path) -> Path:
    """The weights file a checkpoint path names: the file, or a run folder's model.safetensors."""
    path = Path(path)
    if path.is_dir():
        if (path / RUN_WEIGHTS).is_file():
            return path / RUN_WEIGHTS
        raise FileNotFoundError(
            f"checkpoint {path} is a folder without {RUN_WEIGHTS}: {CHECKPOINT_FIX}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: {CHECKPOINT_FIX}")
    return path


def torch_file_kind(path: Path) -> str | None:
    """The kind of torch file from its first bytes: "zip" (torch.save's format), "pickle" (its
    legacy format) or None (neither: not a torch file at all)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _not_torch(path: Path) -> ValueError:
    return ValueError(
        f"checkpoint {path} is not a PyTorch checkpoint (random/corrupt bytes: neither a zip "
        f"archive nor a pickle): re-download or re-copy it, or {CHECKPOINT_FIX}"
    )


def check_checkpoint(path: str | Path) -> Path:
    """Quick checks of a checkpoint before a run starts (no tensors read): it exists and is a
    safetensors file whose header parses, or a torch file (zip or pickle); a run folder's
    model.safetensors for a folder. Returns the file; errors as `read_state_dict`'s."""
    from safetensors import SafetensorError, safe_open

    path = checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                f.keys()
        elif torch_file_kind(path) is None:
            raise _not_torch(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {path} is truncated or not a safetensors file ({e}): "
                         f"re-copy it, or {CHECKPOINT_FIX}") from e  # fmt: skip
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without executing code: safetensors, or a torch pickle with weights_only=True.

    Accepts `{"model": state_dict}` (Meta, MedSAM2), `{"state_dict": ...}` or a bare state dict,
    and a run folder (its model.safetensors, checked against the sha256 in its model.json).
    """
    path = checkpoint_file(path)
    if path.suffix == ".safetensors":
        verify_run_file(path, required=path.name == RUN_WEIGHTS)
        return read_safetensors(path, f"re-copy it, or {CHECKPOINT_FIX}", "checkpoint ")[0]
    try:
        kind = torch_file_kind(path)
    except OSError as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e}): {CHECKPOINT_FIX}") from e
    if kind is None:
        raise _not_torch(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a real pickle the safe unpickler refuses
        raise ValueError(
            f"checkpoint {path} needs arbitrary code execution to unpickle (it holds more than "
            "tensors), so it was not loaded. If you trust its author, re-save only the weights: "
            "torch.save({'model': state_dict}, 'clean.pt'), or convert to safetensors."
        ) from e
    except Exception as e:  # zip/pickle framing errors: a damaged torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"checkpoint {path} is a truncated or corrupt torch file ({first}): re-download or "
            "re-copy it"
        ) from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path} holds no state dict: expected {{'model': state_dict}} "
            "(Meta's format) or a dict of tensors"
        )
    return obj


def guess_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name the variant a SAM 2 state dict was made for, from its Hiera trunk; None if unknown."""
    w = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if w is None:
        return None
    blocks = {k.split(".")[3] for k in state_dict if k.startswith("image_encoder.trunk.blocks.")}
    return _TRUNK_SIGNATURES.get((int(w.shape[0]), len(blocks)))


def load_checkpoint(
    sam: torch.nn.Module, path: str | Path, variant: str | None = None
) -> LoadReport:
    """Load a SAM 2 state dict into `sam` (a sam2 `SAM2Base`); return what did not match.

    A checkpoint of another variant (or with tensors of other shapes) is a ValueError naming both.
    """
    sd = read_state_dict(path)
    found = guess_variant(sd)
    if variant is not None and found is not None and found != variant:
        raise ValueError(
            f"checkpoint {path} is a SAM 2 '{found}' checkpoint but the model is '{variant}': "
            f"build it with variant='{found}' (or --model {found})"
        )
    own = sam.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise ValueError(
            f"checkpoint {path}: {len(bad)} tensors have other shapes than the model "
            f"(e.g. {k}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model); "
            "it was made for another model configuration"
        )
    result = sam.load_state_dict(sd, strict=False)
    return LoadReport(str(path), list(result.missing_keys), list(result.unexpected_keys))


def save_meta_checkpoint(sam: torch.nn.Module, path: str | Path) -> Path:
    """Write `{"model": state_dict}` (Meta's format) atomically; loadable by sam2 and by us."""
    from samed2_kit.utils.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"model": sam.state_dict()}, tmp)
    return path
