"""Run by test_accelerate_launch.py, as `python` (1 process) or under `accelerate launch`:
trains test-tiny a few steps on a store and writes, per rank, the parameters and the losses.

    python ddp_train_script.py STORE OUT BATCH_SIZE_PER_PROCESS [memory | sources | sequence]

With "memory", the model has a confidence memory (every prediction written) and each rank also
writes the bank's digest. With "sources", both prompt sources train on few-shot episodes (the
similarity prior clusters at its first update). With "sequence" (a store of volumes), sequence
training with simulated corrective clicks on half the runs.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from samed2_kit.config import load_recipe
from samed2_kit.engine.train import train
from samed2_kit.model import build_model


def main() -> None:
    store, out, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    memory, sources = sys.argv[4:] == ["memory"], sys.argv[4:] == ["sources"]
    sequence = sys.argv[4:] == ["sequence"]
    extra = ["data.episodes=true", "data.prompt.mode=none", "sources={hard_prototypes: {}, "
             "similarity_prior: {slots: 4, dim: 8, warmup_updates: 1}}"] if sources else []  # fmt: skip
    if sequence:
        extra = ["train.step=sequence", "data.sequence_len=5", "train.clicks.prob=0.5",
                 "train.clicks.rounds=2", "data.tasks=null"]  # fmt: skip
    recipe = load_recipe(
        None,
        ["model.image_size=128", f"train.batch_size={batch}", "train.steps=3",
         "train.warmup_steps=1", "train.lr=0.001", "train.mixed_precision=no",
         "data.tasks=[fetal_head]", "data.augment=false", *extra],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model("test-tiny", None, 128)
    if sequence:  # memory attention's dropout draws depend on the batch layout: off here
        for module in model.sam.memory_attention.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if sources:
        from samed2_kit.model.assemble import add_sources

        add_sources(model, recipe.sources, ["fetal_head"])
    if memory:
        from samed2_kit.memory import MemoryConfig, attach_memory

        attach_memory(model, MemoryConfig(threshold=0.0, capacity=4, top_k=2))
    model, result, accel = train(recipe, model, store, progress=False)
    rank = accel.process_index
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(params, str(out / f"rank{rank}.safetensors"))
    info = {"losses": [h.loss for h in result.history], "world": accel.num_processes}
    if memory:
        info |= {"bank": model.memory.bank.digest(), "entries": len(model.memory.bank)}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    accel.end_training()


if __name__ == "__main__":
    main()
