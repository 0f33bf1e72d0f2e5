"""A new adapter kind and a new prompt-source kind, defined here and registered with one call
each, go through a whole recipe run (train, checkpoint, resume, save, reload, evaluate) without
a line of package code changing: the worked examples of docs/extending.md."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from samed2_kit import registry
from samed2_kit.types import PromptContribution

# --- an adapter: a parallel bottleneck beside the MLP of chosen Hiera blocks ----------------------


@dataclass
class BottleneckConfig:
    width: int = 4
    blocks: list[int] | None = None  # None: every block


class Bottleneck(nn.Module):
    """up(relu(down(x))), added to the block's MLP output; up is zero at init, so the block is
    unchanged until it trains. A submodule of the block: sam2's own key names stay as they are."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.up(torch.relu(self.down(x)))


def _add_bottleneck(adapter, mlp, inputs, output):
    return output + adapter(inputs[0])


def inject_bottleneck(model, cfg: BottleneckConfig) -> None:
    blocks = model.encoder_blocks
    for i in cfg.blocks if cfg.blocks is not None else range(len(blocks)):
        blocks[i].bottleneck = Bottleneck(blocks[i].dim_out, cfg.width)
        blocks[i].mlp.register_forward_hook(
            functools.partial(_add_bottleneck, blocks[i].bottleneck)
        )


BOTTLENECK = registry.AdapterKind(
    "bottleneck", BottleneckConfig, inject_bottleneck, pattern=r"\.bottleneck\."
)

# --- a prompt source that learns without gradients: a running mean of the masks ------------------


@dataclass
class MeanMaskConfig:
    momentum: float = 0.5


class MeanMask(nn.Module):
    """Adds its running mean of the training masks (a learned scale times it) to the dense
    prompt; the mean is updated by `commit`, not by gradients (`samed2_kit.types.Learner`)."""

    def __init__(self, cfg: MeanMaskConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.scale = nn.Parameter(torch.ones(dim, 1, 1))
        self.register_buffer("mean", torch.zeros(1, 1, 1, 1))
        self.register_buffer("commits", torch.zeros((), dtype=torch.long))

    def forward(self, feats, prompts, ctx) -> PromptContribution:
        return PromptContribution(dense=self.scale * self.mean.expand_as(feats.image_embed[:, :1]))

    def candidates(self, update) -> torch.Tensor:
        return update.masks.float().mean().detach().cpu()

    def commit(self, items: list, loss: float) -> None:
        m = self.cfg.momentum
        self.mean.mul_(1 - m).add_(m * torch.stack(items).mean())
        self.commits += 1


MEAN_MASK = registry.SourceKind(
    "mean_mask", MeanMaskConfig, lambda cfg, model, tasks: MeanMask(cfg, model.sam.hidden_dim)
)


@pytest.fixture
def kinds():
    registry.register_adapter(BOTTLENECK)
    registry.register_source(MEAN_MASK)
    yield
    registry.unregister("bottleneck")
    registry.unregister("mean_mask")


@pytest.mark.slow  # two recipe runs end to end; the kinds' errors are checked below
def test_registered_kinds_train_save_and_reload_through_a_recipe(kinds, hc18_store, tmp_path):
    from samed2_kit.adapters.freeze import trainable_table
    from samed2_kit.config import load_recipe
    from samed2_kit.engine.run import run_recipe
    from samed2_kit.engine.state import checkpoint_dirs
    from samed2_kit.model.assemble import from_recipe, load

    overrides = [f"data.store={hc18_store}", "model.image_size=64", "train.steps=3",
                 "train.batch_size=2", "train.warmup_steps=1", "train.mixed_precision=no",
                 "train.save_every=2", "train.tensorboard=false", "eval.max_items=2",
                 "adapters.bottleneck={width: 2, blocks: [1, 3]}", "sources.mean_mask={}",
                 "train.lr_mult={bottleneck: 10}"]  # fmt: skip
    recipe = load_recipe(None, overrides)
    assert recipe.adapters["bottleneck"] == BottleneckConfig(2, [1, 3])
    untrained = from_recipe(recipe)
    assert "bottleneck" in trainable_table(untrained)
    plain = from_recipe(load_recipe(None, overrides[:-3]))  # identity at init: same output
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(untrained.encode(x).image_embed, plain.encode(x).image_embed)

    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert 0.0 <= summary["overall"]["dice"] <= 1.0
    model = load(tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "model.json").read_text())
    assert manifest["adapters"]["bottleneck"] == {"width": 2, "blocks": [1, 3]}
    assert manifest["sources"]["mean_mask"] == {"kind": "mean_mask", "config": {"momentum": 0.5}}
    # both trained: the adapter by gradients (its freeze group, lr_mult 10), the source by commits
    assert model.encoder_blocks[1].bottleneck.up.weight.abs().sum() > 0
    assert not hasattr(model.encoder_blocks[0], "bottleneck")
    source = model.prompt_sources["mean_mask"]
    assert int(source.commits) == 3 and float(source.mean) > 0
    assert model.source_gates["mean_mask"].abs() > 0
    # the reload is the trained model: same state as the run's own checkpoint at the end
    last = checkpoint_dirs(tmp_path / "run")[-1]
    from safetensors.torch import load_file

    ckpt = load_file(str(last / "weights.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ckpt.items())

    # exact resume with the new kinds: rerun from step 2 reproduces step 3
    resumed = load_recipe(None, overrides)
    from samed2_kit.engine.train import read_log

    before = [e["loss"] for e in read_log(tmp_path / "run") if "loss" in e]
    for d in checkpoint_dirs(tmp_path / "run")[1:]:
        import shutil

        shutil.rmtree(d)
    run_recipe(resumed, tmp_path / "run", progress=False, resume=True)
    after = [e["loss"] for e in read_log(tmp_path / "run") if "loss" in e]
    assert after == before


def test_an_unregistered_kind_is_a_clear_error(kinds):
    from samed2_kit.config import load_recipe

    with pytest.raises(
        ValueError, match="unknown key 'adapters.botleneck'.*did you mean 'bottleneck'"
    ):
        load_recipe(None, ["adapters.botleneck={width: 2}"])
    with pytest.raises(ValueError, match="already registered"):
        registry.register_adapter(BOTTLENECK)
    registry.unregister("mean_mask")
    with pytest.raises(ValueError, match="unknown key 'sources.mean_mask'"):
        load_recipe(None, ["sources.mean_mask={}"])


def test_a_registered_reader_serves_read_volume(tmp_path):
    """A new volume format: one `register_reader` call (here: a raw uint8 slice stack)."""
    import numpy as np

    from samed2_kit.medbank import io
    from samed2_kit.medbank.io.volume import Volume

    def read_stack(path, labels):
        z, y, x = (int(v) for v in path.stem.split("_")[-1].split("x"))
        data = np.fromfile(path, np.uint8).reshape(z, y, x)
        return Volume(data.astype(np.int64) if labels else data, (1.0, 1.0, 1.0), meta={})

    io.register_reader(io.Reader("stack", read_stack, (".stack",)))
    try:
        path = tmp_path / "scan_2x3x4.stack"
        np.arange(24, dtype=np.uint8).tofile(path)
        vol = io.read_volume(path)
        assert vol.array.shape == (2, 3, 4) and int(vol.array[1, 2, 3]) == 23
        with pytest.raises(ValueError, match="already registered"):
            io.register_reader(io.Reader("stack", read_stack))
    finally:
        del io.READERS["stack"]


def test_registered_kinds_join_the_freeze_groups_and_the_saved_model(kinds, tmp_path):
    """The fast tier's check of the same: groups, trainable table, save and load (no training)."""
    from samed2_kit.adapters.freeze import groups, policy_for_mode
    from samed2_kit.config import load_recipe
    from samed2_kit.model.assemble import from_recipe, load, save

    recipe = load_recipe(None, ["model.image_size=64", "adapters.bottleneck={width: 2}",
                                "sources.mean_mask={momentum: 0.25}"])  # fmt: skip
    model = from_recipe(recipe)
    assert groups()["bottleneck"] == r"\.bottleneck\."
    assert "bottleneck" in policy_for_mode(model, "decoder").train
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".bottleneck." in name or name.startswith(("prompt_sources", "source_gates")):
                p.add_(0.1)
        model.prompt_sources["mean_mask"].mean.fill_(0.3)
    save(model, tmp_path / "m")
    back = load(tmp_path / "m")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.prompt_sources["mean_mask"].cfg == MeanMaskConfig(0.25)
    from samed2_kit.types import Prompts

    x, box = torch.randn(2, 3, 64, 64), torch.tensor([[8.0, 8.0, 40.0, 40.0]] * 2)
    with torch.no_grad():
        want = model.eval()(x, Prompts(boxes=box)).low_res_logits
        assert torch.equal(back.eval()(x, Prompts(boxes=box)).low_res_logits, want)
