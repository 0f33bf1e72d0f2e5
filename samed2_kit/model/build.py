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


def model_config(variant: str, image_size: int = 1024):
    """The OmegaConf config of `variant` at `image_size` (px, a multiple of 32)."""
    from omegaconf import OmegaConf

    if image_size % 32 or image_size < 64:
        raise ValueError(f"image_size={image_size}: use a multiple of 32, e.g. 256, 512 or 1024")
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights without executing code: safetensors, or a torch pickle with weights_only=True.

    Accepts `{"model": state_dict}` (Meta, MedSAM2), `{"state_dict": ...}` or a bare state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {path} needs arbitrary code execution to unpickle (it holds more than "
            "tensors), so it was not loaded. If you trust its author, re-save only the weights: "
            "torch.save({'model': state_dict}, 'clean.pt'), or convert to safetensors."
        ) from e
    except Exception as e:  # zip/pickle framing errors: not a torch file at all
        raise ValueError(f"checkpoint {path} is not a readable torch file ({e})") from e
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
