"""Temporal adapter: mixes adjacent slices (or frames) inside the Hiera blocks of SAM 2's encoder.

A batch holds clips of T adjacent slices, clip-major: rows b*T .. b*T+T-1 are clip b's slices in
order (`SAMed2Model.encode(images, clip_len=T)`). In each chosen block, on the attention output
after `window_unpartition` (the un-windowed per-image map) and before the block's residual:

    y (B*T, h, w, C) -> LayerNorm -> Linear(C->r) -> (B, r, T, h, w) -> Conv3d(k, k, k) over (T, h, w)
      -> GELU -> Linear(r->C), weight and bias zero at init -> y + that

So at init the wrapped encoder equals the plain one exactly. T=1 works (the temporal axis is zero
padded: a spatial k x k conv in effect); any number of clips. This fixes the seed's adapter, which
paired neighbouring attention windows, needed an even batch and was not identity at init.

The adapter is registered as a submodule of its block (`temporal_adapter`), so sam2's key names are
unchanged (Meta checkpoints load) and new keys are `image_encoder.trunk.blocks.<i>.temporal_adapter.*`
under `model.sam`. The block's `forward` is overridden per instance by a `functools.partial` holding
the block and the model (no closure), so `copy.deepcopy(model)` and pickling rebind it to the copy.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from samed2_kit.model import _sam2
from samed2_kit.registry import AdapterKind

if TYPE_CHECKING:
    from samed2_kit.model.wrapper import SAMed2Model

ADAPTER_NAME = "temporal_adapter"
# Matches the parameter names of temporal adapters, for freeze policies and parameter groups.
TEMPORAL_PATTERN = r"\.temporal_adapter\."


@dataclass
class TemporalAdapterConfig:
    """rank: bottleneck width r; kernel: Conv3d kernel (odd) over (T, h, w); blocks: Hiera block
    indices to adapt (None = all blocks)."""

    rank: int = 32
    kernel: int = 3
    blocks: list[int] | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"temporal adapter rank={self.rank}: use a positive integer, e.g. 32")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"temporal adapter kernel={self.kernel}: use an odd size, e.g. 3")
        if self.blocks is not None and len(self.blocks) == 0:
            raise ValueError("temporal adapter blocks=[]: list block indices, or None for all")


class TemporalAdapter(nn.Module):
    """Residual bottleneck with a 3D conv over (T, h, w); identity at init (zero up-projection)."""

    def __init__(self, dim: int, rank: int = 32, kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"TemporalAdapter kernel={kernel}: use an odd size, e.g. 3")
        self.dim, self.rank, self.kernel = dim, rank, kernel
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, rank)
        self.conv = nn.Conv3d(rank, rank, (kernel,) * 3, padding=kernel // 2)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor, clip_len: int) -> torch.Tensor:
        """y (B*T, h, w, C) with T = clip_len, clip-major -> (B*T, h, w, C)."""
        if y.ndim != 4 or y.shape[-1] != self.dim:
            raise ValueError(
                f"TemporalAdapter(dim={self.dim}) takes (B*T, h, w, {self.dim}), got "
                f"{tuple(y.shape)}: apply it to the un-windowed block output"
            )
        n, h, w, _ = y.shape
        if clip_len < 1 or n % clip_len:
            raise ValueError(
                f"TemporalAdapter: batch of {n} maps is not a multiple of clip_len={clip_len}; "
                "give whole clips (B = clips * clip_len)"
            )
        z = self.down(self.norm(y))  # (B*T, h, w, r)
        z = z.reshape(n // clip_len, clip_len, h, w, self.rank).permute(0, 4, 1, 2, 3)
        z = self.conv(z)  # (B, r, T, h, w)
        z = z.permute(0, 2, 3, 4, 1).reshape(n, h, w, self.rank)
        return y + self.up(self.act(z))


def _adapted_forward(block: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's forward with its temporal adapter after attention; T read from `model.clip`."""
    adapter = getattr(block, ADAPTER_NAME)
    return _sam2.hiera_block_forward(block, x, after_attn=lambda y: adapter(y, model.clip.clip_len))


def _block_kind(block: nn.Module) -> str:
    kind = f"window {block.window_size}" if block.window_size > 0 else "global"
    return f"q-pool, {kind}" if block.q_stride else kind


@dataclass
class TemporalHandle:
    """What `inject_temporal_adapters` did; `remove()` undoes it.

    adapters: block index -> its TemporalAdapter. After `copy.deepcopy(model)` the copy carries its
    own adapters and forwards, but this handle still refers to the original model.
    """

    model: SAMed2Model = field(repr=False)
    config: TemporalAdapterConfig
    adapters: dict[int, TemporalAdapter] = field(default_factory=dict)
    _previous: dict[int, object] = field(default_factory=dict, repr=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for a in self.adapters.values() for p in a.parameters())

    def remove(self) -> None:
        """Restore the blocks' original forwards and delete the adapter submodules (idempotent)."""
        blocks = self.model.encoder_blocks
        for i in list(self.adapters):
            block = blocks[i]
            previous = self._previous.pop(i, None)
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
            delattr(block, ADAPTER_NAME)
            del self.adapters[i]

    def report(self) -> str:
        """A table: block, dim, kind (window/global/q-pool), parameters; total and % of model."""
        blocks = self.model.encoder_blocks
        rows = [f"{'block':>5}  {'dim':>5}  {'kind':<18}  {'params':>10}"]
        for i, adapter in sorted(self.adapters.items()):
            n = sum(p.numel() for p in adapter.parameters())
            rows.append(f"{i:>5}  {adapter.dim:>5}  {_block_kind(blocks[i]):<18}  {n:>10,}")
        total = self.num_parameters()
        whole = sum(p.numel() for p in self.model.parameters())
        share = 100.0 * total / whole if whole else 0.0
        rows.append(
            f"total: {total:,} temporal-adapter parameters in {len(self.adapters)} blocks "
            f"(rank {self.config.rank}, kernel {self.config.kernel}), {share:.2f}% of the "
            f"model's {whole:,}"
        )
        return "\n".join(rows)


def _chosen_blocks(blocks: list[int] | None, depth: int) -> list[int]:
    if blocks is None:
        return list(range(depth))
    bad = [i for i in blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"temporal adapter blocks {bad} do not exist: this encoder has blocks 0..{depth - 1}"
        )
    return sorted(set(blocks))


def inject_temporal_adapters(
    model: SAMed2Model, cfg: TemporalAdapterConfig | None = None
) -> TemporalHandle:
    """Add a TemporalAdapter to the chosen Hiera blocks of `model` (a `SAMed2Model`).

    Each adapter has dim = block.dim_out, lives at `<block>.temporal_adapter` (on the block's device
    and dtype) and runs in the block's forward on the un-windowed attention output. The clip length
    T comes from `model.clip.clip_len` at call time (set by `model.encode(images, clip_len=T)`).
    """
    cfg = cfg or TemporalAdapterConfig()
    blocks = model.encoder_blocks
    if any(hasattr(b, ADAPTER_NAME) for b in blocks):
        raise ValueError(
            "the model already has temporal adapters: inject once, or call handle.remove() first"
        )
    handle = TemporalHandle(model, cfg)
    for i in _chosen_blocks(cfg.blocks, len(blocks)):
        block = blocks[i]
        ref = next(block.parameters())
        adapter = TemporalAdapter(block.dim_out, cfg.rank, cfg.kernel)
        adapter.to(device=ref.device, dtype=ref.dtype)
        block.add_module(ADAPTER_NAME, adapter)
        handle._previous[i] = block.__dict__.get("forward")
        block.forward = functools.partial(_adapted_forward, block, model)
        handle.adapters[i] = adapter
    return handle


def temporal_parameter_names(model: nn.Module) -> list[str]:
    """Names of the temporal-adapter parameters of `model` (those matching TEMPORAL_PATTERN)."""
    pattern = re.compile(TEMPORAL_PATTERN)
    return [name for name, _ in model.named_parameters() if pattern.search(name)]


_BLOCK_KEY = re.compile(r"image_encoder\.trunk\.blocks\.(\d+)\.temporal_adapter\.")


def temporal_config(model: nn.Module) -> dict | None:
    """rank, kernel and blocks of the model's temporal adapters, read from its state dict (None:
    it has none): what the manifest saves, whoever injected them."""
    sd = model.sam.state_dict()
    blocks = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY.search(k))})
    if not blocks:
        return None
    pre = f"image_encoder.trunk.blocks.{blocks[0]}.temporal_adapter."
    return {
        "rank": int(sd[pre + "down.weight"].shape[0]),
        "kernel": int(sd[pre + "conv.weight"].shape[-1]),
        "blocks": blocks,
    }


def _restore(model: SAMed2Model, saved: dict) -> TemporalHandle | None:
    """Inject temporal adapters as `temporal_config` described them, unless the model has them."""
    if temporal_config(model) is not None:
        return None
    return inject_temporal_adapters(model, TemporalAdapterConfig(**saved))


KIND = AdapterKind(
    name="temporal",
    config=TemporalAdapterConfig,
    inject=inject_temporal_adapters,
    pattern=TEMPORAL_PATTERN,
    group="temporal_adapter",
    label="temporal adapters",
    describe=temporal_config,
    restore=_restore,
)
