"""Encoder adapters and trainable-parameter policies.

- `temporal`: our temporal adapter (mixes adjacent slices/frames inside the Hiera blocks);
- `lora`: LoRA and other PEFT presets through `peft`;
- `freeze`: which parameters train;
- `io`: adapter-only save and load.

Nothing is imported here: import the submodule you need (`from samed2_kit.adapters.temporal import
inject_temporal_adapters`).
"""
