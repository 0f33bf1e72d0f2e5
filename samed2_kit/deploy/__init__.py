"""Deployment: the model as ONNX graphs (`samed2 export`) and an onnxruntime backend.

- `contract`: what an export folder is (manifest format, graph and tensor names); no torch;
- `graphs`: torch modules with plain-tensor inputs and outputs around a `SAMed2Model` (the image
  encoder; the prompt encoder + mask decoder with the prompt sources' contributions), what
  `torch.onnx.export` traces;
- `export`: `export_onnx(run_or_model, out)` writes an export folder atomically: the graphs and a
  `manifest.json` (model spec, graph inputs/outputs, sha256 digests, preprocessing);
- `runtime`: `OnnxModel(export_dir)`, the graphs through onnxruntime (numpy in, numpy out), what
  `Predictor(export_dir, backend="onnx")` runs;
- `propagation`: volume propagation's memory graphs and their onnxruntime runner.

onnx and onnxruntime (the `export` extra: `pip install "samed2-kit[export]"`) are imported only
inside the functions that need them: this package imports without them. See docs/deploy.md.
"""
