"""`samed2 export --quantize int8`: the image encoder graph(s) of an export folder replaced by
their dynamic int8 quantisation (onnxruntime), the decoder and memory graphs left in fp32."""

from __future__ import annotations

from pathlib import Path

from samed2_kit.deploy.contract import CLIP_ENCODER, ENCODER, QUANTIZE, require
from samed2_kit.deploy.describe import graph_entry

# what `quantize="int8"` does to the image encoder(s): the fastest of QInt8 / QUInt8 weights, per
# tensor / per channel, MatMul / all supported ops, measured by bench/bench_inference.py (tiny,
# 2 CPU cores with AVX-512 VNNI + AMX): QInt8 on MatMul 1.8x faster than fp32, QUInt8 no faster,
# Conv (ConvInteger) slower; per channel: as fast, closer to fp32
QUANT_SETTINGS = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                  "per_channel": True, "op_types": ["MatMul"]}  # fmt: skip


def check_quantize(quantize, what: str = "quantize") -> str | None:
    """`quantize` if it is None or one of `QUANTIZE`, else a ValueError naming `what`."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"{what}={quantize!r}: use one of {', '.join(QUANTIZE)}, or leave it out "
                         "for fp32 graphs")  # fmt: skip
    return quantize


class _DropQuantNotes:
    """A logging filter dropping onnxruntime.quantization's advice records (it logs through the
    root logger, e.g. "Please consider to run pre-processing before quantization")."""

    def filter(self, record) -> bool:
        return "onnxruntime" not in record.pathname or "quantization" not in record.pathname


def quantize_encoders(folder: Path, entries: dict, quantize: str) -> dict:
    """Replace the image encoder graph(s) in `folder` by their dynamic int8 quantisation
    (`QUANT_SETTINGS`), each written to a temporary file first; returns the manifest's
    "quantization" entry. `entries` ({graph name: manifest entry}) is updated with the new files'
    digests, inputs and outputs (the encoder's I/O stays float32)."""
    import logging

    ort = require("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    s = QUANT_SETTINGS
    done = []
    root = logging.getLogger()
    drop = _DropQuantNotes()
    root.addFilter(drop)
    try:
        for name in (ENCODER, CLIP_ENCODER):
            if name not in entries:
                continue
            path = folder / entries[name]["file"]
            tmp = path.with_name(f".{path.name}.int8")
            quantize_dynamic(path, tmp, weight_type=getattr(QuantType, s["weight_type"]),
                             per_channel=s["per_channel"], op_types_to_quantize=s["op_types"])  # fmt: skip
            tmp.replace(path)
            keep = {k: v for k, v in entries[name].items() if k == "clip_len"}
            entries[name] = graph_entry(path, **keep, quantized=quantize)
            done.append(name)
    finally:
        root.removeFilter(drop)
    return {"mode": quantize, **s, "graphs": done, "onnxruntime_version": ort.__version__}
