"""Training checkpoints for exact resume: safetensors + JSON only, written atomically, last K kept.

    RUN/checkpoints/step-000120/
      weights.safetensors     every trainable parameter + every buffer (the model's own key names);
                              frozen weights are not copied, their sha256 is (`frozen_sha256`)
      optimizer.safetensors   optimizer state tensors, keyed "<param index>.<name>"
      rng.safetensors         torch CPU (+ CUDA) generator states, per rank
      memory.safetensors      the confidence memory bank, when the model has one
      state.json              written last: step, consumed micro-batches, scheduler state,
                              optimizer groups, Python/NumPy RNG states per rank, recipe digest,
                              sha256 of every file above

A folder only appears under its final name once complete (temp folder + rename), and `load`
verifies every file's sha256 before touching the model: a crash mid-write or a damaged file never
loads as valid. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from samed2_kit.utils.atomic import sha256_file

FORMAT_VERSION = 1
STATE = "state.json"
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Position:
    """Where training stands: optimizer steps done and global micro-batches consumed."""

    step: int = 0
    consumed: int = 0


def frozen_sha256(model: torch.nn.Module) -> str:
    """Digest of the parameters that do not train (names, shapes, bytes): what a checkpoint does
    not store, so what a resumed run must rebuild identically."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            t = p.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + buffers, detached on CPU."""
    out = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out.update(dict(model.named_buffers()))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{key}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, v in [*tensors.items(), *rest["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: torch tensors and JSON-able Python/NumPy states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    rest = {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    v, state, gauss = rest["python"]
    random.setstate((v, tuple(state), gauss))


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders are not listed)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    pos: Position,
    meta: dict,
    rng_by_rank: list[tuple[dict, dict]],
    keep_last: int = 3,
    extra_state=None,
) -> Path:
    """Write checkpoint `step-<pos.step>` (main process only) and keep the newest `keep_last`.

    `rng_by_rank`: every rank's `rng_state()` (gathered by the caller); `meta`: JSON-able facts
    a resume checks (recipe digest, frozen-weight digest, world size); `extra_state(folder) ->
    [file names]` writes state kept in its own files (the memory bank: `assemble.save_state`),
    verified like the rest."""
    from safetensors.torch import save_file

    from samed2_kit.utils.atomic import atomic_path

    dest = Path(run_dir) / CKPT_DIR / f"step-{pos.step:06d}"
    opt_tensors, opt_rest = flatten_optimizer(optimizer.state_dict())
    rng_tensors = {f"rank{r}.{k}": v for r, (t, _) in enumerate(rng_by_rank) for k, v in t.items()}
    files = {"weights": trainable_state(model), "optimizer": opt_tensors, "rng": rng_tensors}
    with atomic_path(dest, directory=True) as tmp:
        digests = {}
        for name, tensors in files.items():
            path = tmp / f"{name}.safetensors"
            save_file(tensors, str(path), metadata={"format": "samed2-kit-train-state"})
            digests[path.name] = sha256_file(path)
        for name in extra_state(tmp) if extra_state is not None else []:
            digests[name] = sha256_file(tmp / name)
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            "format_version": FORMAT_VERSION,
            "step": pos.step,
            "consumed": pos.consumed,
            "scheduler": sched,
            "optimizer": opt_rest,
            "rng": [rest for _, rest in rng_by_rank],
            "meta": meta,
            "files": digests,
        }
        (tmp / STATE).write_text(json.dumps(state, default=_json_default))
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint's state.json")


def _fix(folder: Path) -> str:
    return (
        f"delete {folder} to resume from the checkpoint before it, or start the run again "
        "without --resume"
    )


def _tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; a damaged one is a ValueError naming it and the fix."""
    from samed2_kit.model.build import read_safetensors

    return read_safetensors(folder / name, _fix(folder), "checkpoint file ")[0]


def read_state(folder: Path) -> dict:
    """state.json of a checkpoint, with every listed file's sha256 verified."""
    path = folder / STATE
    fix = _fix(folder)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is missing or corrupt ({e}): {fix}") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} is not a JSON object: {fix}")
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {state.get('format_version')!r}, this samed2-kit reads "
            f"{FORMAT_VERSION}: {fix}"
        )
    missing = [k for k in ("step", "consumed", "scheduler", "optimizer", "rng", "meta", "files")
               if k not in state]  # fmt: skip
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: {fix}")
    for name, digest in state["files"].items():
        f = folder / name
        if not f.is_file() or sha256_file(f) != digest:
            raise ValueError(f"checkpoint file {f} is missing or corrupt (sha256 mismatch): {fix}")
    return state


def load(folder: Path, model: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> Position:
    """Restore model (trainable part), optimizer, scheduler and this rank's RNG from `folder`;
    returns the position. The caller checks `read_state(folder)["meta"]` before calling this;
    files of `extra_state` (the memory bank) are read by `assemble.load_state`."""
    state = read_state(folder)
    weights = _tensors(folder, "weights.safetensors")
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing, unknown = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"checkpoint {folder} does not fit this model: {len(missing)} missing tensors "
            f"{missing[:3]}, {len(unknown)} unexpected {unknown[:3]}. It was written by another "
            "recipe (model, adapters or train.mode/trainable): resume with the run's recipe"
        )
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in weights.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint {folder}: {k} has shape {tuple(v.shape)}, model "
                                 f"{tuple(own[k].shape)}: resume with the run's recipe")  # fmt: skip
            own[k].copy_(v)
    opt_tensors = _tensors(folder, "optimizer.safetensors")
    optimizer.load_state_dict(unflatten_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(
        {**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    rng = _tensors(folder, "rng.safetensors")
    ranks = len(state["rng"])
    if rank >= ranks:
        raise ValueError(
            f"checkpoint {folder} was written by {ranks} process(es); resume with the same "
            "number (accelerate launch --num_processes N)"
        )
    mine = {k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")}
    set_rng_state(mine, state["rng"][rank])
    return Position(state["step"], state["consumed"])
