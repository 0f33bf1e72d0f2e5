"""Volume propagation on ONNX (`samed2_kit.deploy.propagation`): sam2's rotary memory attention in
real arithmetic (equal to sam2's complex form), the memory graphs against torch on random and on
real inputs, and whole volumes propagated through onnxruntime against the torch backend."""

import json

import numpy as np
import pytest
import torch

from tests._propagation import propagating_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from samed2_kit.deploy.propagation import (  # noqa: E402
    OnnxPropagation,
    TorchImagePath,
    export_propagation,
)
from samed2_kit.model import _sam2  # noqa: E402
from samed2_kit.prompts import Prompt  # noqa: E402
from samed2_kit.types import ImageFeatures  # noqa: E402
from samed2_kit.volume import propagate_volume  # noqa: E402

S = 256  # test-tiny at 256 px: C = 64, m = 32 (a pointer is 2 memory tokens), h = w = 16
HIPPO = "samed2_kit/sample_data/msd_hippocampus/"


def _model(present: bool = True):
    return propagating_model(S, present, vary_slots=True)


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """(folder, entries) of `export_propagation` alone: the two memory graphs."""
    folder = tmp_path_factory.mktemp("propagation")
    return folder, export_propagation(model, folder, S, opset=17)


@pytest.fixture(scope="module")
def runner(model, exported):
    """The memory graphs on onnxruntime, the image path on torch."""
    return OnnxPropagation(exported[0], exported[1], image_path=TorchImagePath(model))


@pytest.fixture(scope="module")
def hippo():
    """13 slices of a bundled hippocampus MR volume around the label's middle slice, its label
    and that slice's index in the crop."""
    from samed2_kit.medbank.io import read_volume

    image = read_volume(HIPPO + "images/hippocampus_001.nii.gz").array
    label = read_volume(HIPPO + "labels/hippocampus_001.nii.gz", labels=True).array > 0
    zs = np.nonzero(label.any((1, 2)))[0]
    z = int(zs[len(zs) // 2])
    return image[z - 6 : z + 7], label[z - 6 : z + 7], 6


def _box_click(mask: np.ndarray) -> Prompt:
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
    return Prompt(box=box, points=np.array([[xs.mean(), ys.mean()]]), labels=[1])


# --- 1. rotary encoding in real arithmetic ------------------------------------------------------


def test_rope_tables_are_sam2s_complex_frequencies(model):
    from sam2.modeling.position_encoding import compute_axial_cis

    attn = model.sam.memory_attention.layers[0].cross_attn_image
    for h, w in ((16, 16), (4, 4)):
        cis = compute_axial_cis(64, end_x=w, end_y=h, theta=10000.0)
        cos, sin = _sam2.rope_tables(attn, h, w)
        assert cos.shape == (h * w, 32) and cos.dtype == torch.float32
        assert torch.allclose(cos, cis.real, atol=1e-6) and torch.allclose(sin, cis.imag, atol=1e-6)


@pytest.mark.parametrize("repeat", [1, 3])
def test_apply_rope_equals_sam2s_apply_rotary_enc(repeat):
    from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 64 * repeat, 16, generator=g)
    cis = compute_axial_cis(16, 8, 8)
    theirs_q, theirs_k = apply_rotary_enc(q, k, cis, repeat_freqs_k=repeat > 1)
    cos, sin = cis.real.contiguous(), cis.imag.contiguous()
    assert torch.allclose(_sam2.apply_rope(q, cos, sin), theirs_q, atol=1e-5)
    assert torch.allclose(_sam2.apply_rope(k, cos, sin), theirs_k, atol=1e-5)


@pytest.mark.parametrize("excluded", [0, 6])
def test_rope_attention_equals_sam2s_rope_attention_with_several_heads(excluded):
    from sam2.modeling.sam.transformer import RoPEAttention

    torch.manual_seed(0)
    attn = RoPEAttention(embedding_dim=64, num_heads=4, kv_in_dim=32, rope_k_repeat=True,
                         feat_sizes=(8, 8)).eval()  # fmt: skip
    q, k, v = (
        torch.randn(2, 64, 64),
        torch.randn(2, 128 + excluded, 32),
        torch.randn(2, 128 + excluded, 32),
    )
    with torch.no_grad():
        theirs = attn(q, k.clone(), v, num_k_exclude_rope=excluded)
        n = k.shape[1] - excluded
        extra = (k[:, n:], v[:, n:]) if excluded else (None, None)
        ours = _sam2.rope_attention(attn, q, k[:, :n], v[:, :n], (8, 8), *extra)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    plain = RoPEAttention(embedding_dim=64, num_heads=4, feat_sizes=(8, 8))
    with pytest.raises(ValueError, match="rope_k_repeat=True"):
        _sam2.rope_attention(plain, q, torch.randn(2, 128, 64), torch.randn(2, 128, 64), (8, 8))


@pytest.mark.parametrize("pointers", [0, 4])
def test_memory_attention_in_real_arithmetic_equals_sam2s(model, pointers):
    """Random inputs, 3 memory entries (768 tokens) and 0 or 4 object pointers (8 tokens, not
    rotated): `_sam2.memory_attention` equals `sam.memory_attention` to 1e-5."""
    sam, g = model.sam, torch.Generator().manual_seed(1)
    hw, b, ptr_tokens = 256, 2, pointers * 2
    curr, curr_pos = torch.randn(hw, b, 64, generator=g), torch.randn(hw, b, 64, generator=g)
    mem = torch.randn(3 * hw + ptr_tokens, b, 32, generator=g)
    mem_pos = torch.randn(3 * hw + ptr_tokens, b, 32, generator=g)
    with torch.no_grad():
        theirs = sam.memory_attention(
            curr=[curr],
            memory=mem,
            curr_pos=[curr_pos],
            memory_pos=mem_pos,
            num_obj_ptr_tokens=ptr_tokens,
        )
        ours = _sam2.memory_attention(sam, curr, mem, curr_pos, mem_pos, ptr_tokens)
    assert ours.shape == (hw, b, 64)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


# --- 2. the graphs: files, manifest entries, parity with torch ----------------------------------


def test_export_writes_two_graphs_with_their_entries_and_metadata(model, exported):
    import onnx

    folder, entries = exported
    assert set(entries) == {"memory_encoder", "memory_attention"}
    from samed2_kit.utils.atomic import sha256_file

    for name, entry in entries.items():
        assert entry["file"] == f"{name}.onnx"
        assert sha256_file(folder / entry["file"]) == entry["sha256"]
        meta = {p.key: p.value for p in onnx.load(str(folder / entry["file"])).metadata_props}
        config = json.loads(meta["samed2.propagation"])
        assert config["image_size"] == S and config["num_maskmem"] == 7 and config["mem_dim"] == 32
    io = {n: {v["name"]: (v["shape"], v["dtype"]) for v in e["inputs"] + e["outputs"]}
          for n, e in entries.items()}  # fmt: skip
    assert io["memory_encoder"] == {
        "image_embed": (["batch", 64, 16, 16], "float32"),
        "mask_logits": (["batch", 1, 64, 64], "float32"),
        "object_score_logits": (["batch", 1], "float32"),
        "mask_tokens": (["batch", "tokens", 64], "float32"),
        "iou": (["batch", "tokens"], "float32"),
        "memory": (["batch", 32, 16, 16], "float32"),
        "object_pointer": (["batch", 64], "float32"),
    }
    assert io["memory_attention"] == {
        "image_embed": (["batch", 64, 16, 16], "float32"),
        "image_pos": (["batch", 64, 16, 16], "float32"),
        "memory": (["batch", "memories", 32, 16, 16], "float32"),
        "memory_slots": (["memories"], "int64"),
        "pointers": (["pointers", "batch", 64], "float32"),
        "pointer_positions": (["pointers"], "float32"),
        "conditioned": (["batch", 64, 16, 16], "float32"),
    }


@pytest.mark.parametrize("b, n, p", [(1, 1, 0), (1, 7, 15), (3, 2, 4)])
def test_graphs_equal_torch_on_random_inputs(model, runner, b, n, p):
    """Any batch, number of memories (1..7) and of object pointers (none too), and decoder
    tokens M = 3 (the best by IoU makes the pointer): onnxruntime equals `_sam2` (sam2's complex
    memory attention) to 1e-4."""
    sam, g = model.sam, torch.Generator().manual_seed(n + p)
    embed, pos = torch.randn(b, 64, 16, 16, generator=g), torch.randn(b, 64, 16, 16, generator=g)
    memory = torch.randn(b, n, 32, 16, 16, generator=g)
    slots = [min(i, 5) for i in range(n - 1)] + [6]
    ptrs, distances = torch.randn(p, b, 64, generator=g), list(range(1, p + 1))
    feats = ImageFeatures(embed, [], pos)
    with torch.no_grad():
        want = _sam2.attend_memory(sam, feats, memory, slots, (ptrs, distances, 20) if p else None)
    rel = _sam2.pointer_positions(sam, distances, 20).numpy()
    got = runner.attend(embed.numpy(), pos.numpy(), memory.numpy(), slots, ptrs.numpy(), rel)
    assert got.shape == (b, 64, 16, 16)
    assert np.abs(got - want.numpy()).max() <= 1e-4

    low = torch.randn(b, 1, 64, 64, generator=g) * 8
    obj = torch.tensor([[3.0], [-2.0], [0.5]])[:b]  # "no object" in the second row
    tokens, iou = torch.randn(b, 3, 64, generator=g), torch.rand(b, 3, generator=g)
    with torch.no_grad():
        want_mem = _sam2.encode_memory(sam, feats, low, obj)
        want_ptr = _sam2.object_pointer(sam, tokens, iou, obj)
    mem, ptr = runner.encode_memory(embed.numpy(), low.numpy(), obj.numpy(), tokens.numpy(),
                                    iou.numpy())  # fmt: skip
    assert np.abs(mem - want_mem.numpy()).max() <= 1e-4
    assert np.abs(ptr - want_ptr.numpy()).max() <= 1e-4


def test_graphs_equal_torch_on_real_inputs(model, runner, hippo):
    """Features of hippocampus slices and a prompted slice's real prediction: the memory graph
    and then memory attention over it (with its pointer) equal the torch steps to 1e-4."""
    from samed2_kit.medbank.preprocess import to_model_input
    from samed2_kit.volume.propagate import _TorchSteps, volume_intensity

    image, label, c = hippo
    f01 = volume_intensity(image, "mr")
    x = torch.stack([to_model_input(np.repeat(f01(z)[..., None], 3, 2), S) for z in (c, c + 1)])
    steps = _TorchSteps(model)
    with torch.no_grad():
        feats = model.encode(x)
        p = _box_click(label[c])
        h, w = image.shape[1:]
        scale = np.array([S / w, S / h], np.float32)
        prompts = _sam2_prompts(p, scale)
        first = steps.prompted(feats.select(slice(0, 1)), prompts)
        res = model.decode(feats.select(slice(0, 1)), prompts, False, use_memory=False)
    mem, ptr = runner.encode_memory(feats.image_embed[:1].numpy(), res.low_res_logits.numpy(),
                                    res.object_score_logits.numpy(), res.tokens.numpy(),
                                    res.iou.numpy())  # fmt: skip
    assert np.abs(mem - first.memory.numpy()).max() <= 1e-4
    assert np.abs(ptr - first.pointer.numpy()).max() <= 1e-4
    nxt = feats.select(slice(1, 2))
    with torch.no_grad():
        want = _sam2.attend_memory(model.sam, nxt, first.memory[:, None], [6],
                                   (first.pointer[None], [1], len(image)))  # fmt: skip
    rel = _sam2.pointer_positions(model.sam, [1], len(image)).numpy()
    got = runner.attend(nxt.image_embed.numpy(), nxt.pos.numpy(), mem[:, None], [6], ptr[None],
                        rel)  # fmt: skip
    assert np.abs(got - want.numpy()).max() <= 1e-4


def _sam2_prompts(p: Prompt, scale: np.ndarray):
    from samed2_kit.types import Prompts

    pts = torch.from_numpy((p.points * scale).astype(np.float32))[None]
    box = torch.from_numpy((p.box.reshape(2, 2) * scale).reshape(1, 4).astype(np.float32))
    return Prompts(pts, torch.ones(1, 1, dtype=torch.int64), box)


def test_export_errors_name_the_fix(model, tmp_path):
    with pytest.raises(ValueError, match="built for 256: export at the model's image size"):
        export_propagation(model, tmp_path, 512)
    with pytest.raises(ValueError, match="opset=13; give >= 14"):
        export_propagation(model, tmp_path, S, opset=13)
    assert not list(tmp_path.iterdir())


# --- 3. whole volumes through onnxruntime -------------------------------------------------------


def _differ(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


def test_memory_graphs_propagate_the_same_volume(model, runner, hippo):
    """The torch image path with the two memory graphs on onnxruntime: the same volume as the
    torch backend (a box + click prompt, both directions, a queue of 3 memories; a mask prompt
    going up only). Observed: identical; allowed: 1e-3 of the voxels (logit ties at 0)."""
    image, label, c = hippo
    prompt = {c: _box_click(label[c])}
    want = propagate_volume(model, image, prompt, memory_frames=3)
    got = propagate_volume(runner, image, prompt, memory_frames=3, backend="onnx")
    assert want[c].any() and want.sum() > want[c].sum() and _differ(got, want) <= 1e-3
    mask = {c: {"mask": label[c]}}
    want = propagate_volume(model, image, mask, direction="up")
    got = propagate_volume(runner, image, mask, direction="up", backend="onnx")
    assert not want[:c].any() and want[c + 1 :].any() and _differ(got, want) <= 1e-3


def test_an_export_folder_propagates_the_same_volume_on_onnxruntime_alone(model, hippo, tmp_path):
    """`samed2 export`'s folder (image encoder, prompt decoder and the memory graphs):
    `propagate_volume(None, ..., backend="onnx", export_dir=...)` equals the torch backend; with
    an untrained object score too (every propagated slice gated to "no object")."""
    from samed2_kit.deploy.export import export_onnx

    image, label, c = hippo
    prompt = {c: _box_click(label[c])}
    for m, name in ((model, "present"), (_model(present=False), "plain")):
        folder = export_onnx(m, tmp_path / name)
        want = propagate_volume(m, image, prompt)
        got = propagate_volume(None, image, prompt, backend="onnx", export_dir=folder)
        assert _differ(got, want) <= 1e-3
        assert want[c].any()
        assert np.delete(want, c, 0).any() == (name == "present")


def test_backend_errors_name_the_fix(model, exported, hippo, tmp_path):
    image, label, c = hippo
    prompt = {c: _box_click(label[c])}
    with pytest.raises(ValueError, match="backend='onnx' needs export_dir="):
        propagate_volume(model, image, prompt, backend="onnx")
    with pytest.raises(ValueError, match=r"backend='tf': one of \('torch', 'onnx'\)"):
        propagate_volume(model, image, prompt, backend="tf")
    with pytest.raises(ValueError, match="backend='torch' needs a SAMed2Model"):
        propagate_volume(None, image, prompt)
    with pytest.raises(FileNotFoundError, match="not found: write one with `samed2 export"):
        OnnxPropagation(tmp_path / "none", image_path=TorchImagePath(model))
    folder, entries = exported
    bad = {**entries, "memory_encoder": {**entries["memory_encoder"], "sha256": "0" * 64}}
    with pytest.raises(ValueError, match="memory_encoder.onnx: sha256 .* export the model again"):
        OnnxPropagation(folder, bad, image_path=TorchImagePath(model))


# --- 4. the runner without torch ----------------------------------------------------------------


def test_the_runner_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys\nimport samed2_kit.deploy.propagation, samed2_kit.deploy.runtime\n"
            "from samed2_kit.deploy.propagation import OnnxPropagation\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_slot_and_position_rules_equal_sam2s(model):
    from samed2_kit.deploy.propagation import NO_OBJECT_LOGIT, frame_slots, pointer_positions
    from samed2_kit.volume.sequence import NO_OBJECT_LOGIT as SEQUENCE_NO_OBJECT

    sam = model.sam
    assert NO_OBJECT_LOGIT == SEQUENCE_NO_OBJECT
    for recent in range(10):
        assert frame_slots(sam.num_maskmem, recent) == _sam2.frame_slots(sam, recent)
    for n in (1, 2, 5, 16, 40):
        d = [n, *range(1, 20)]
        want = _sam2.pointer_positions(sam, d, n).numpy()
        assert np.array_equal(pointer_positions(sam.max_obj_ptrs_in_encoder, d, n), want)


def test_propagate_slices_equals_propagate_volume(model, hippo, tmp_path):
    """`OnnxPropagation.propagate_slices` (numpy only) on an export folder gives the masks of
    `propagate_volume(..., backend="onnx")` on the same slices: both directions, one, none, no
    memory; box and box + click. Observed: identical."""
    from samed2_kit.deploy.export import export_onnx
    from samed2_kit.deploy.propagation import OnnxPropagation
    from samed2_kit.deploy.runtime import upsample_logits
    from samed2_kit.medbank.preprocess import to_model_input
    from samed2_kit.volume.propagate import volume_intensity

    image, label, c = hippo
    folder = export_onnx(model, tmp_path / "onnx")
    runner = OnnxPropagation(folder)
    f01 = volume_intensity(image, "mr")
    inputs = [
        to_model_input(np.repeat(f01(z)[..., None], 3, 2), S).numpy() for z in range(len(image))
    ]
    h, w = image.shape[1:]
    scale = np.array([S / w, S / h], np.float32)
    p = _box_click(label[c])
    cases = [({"direction": "both"}, False), ({"direction": "up", "memory_frames": 2}, True),
             ({"direction": "down", "memory_frames": 0}, False), ({"direction": "none"}, True)]  # fmt: skip
    for kw, click in cases:
        prompt = Prompt(box=p.box, points=p.points, labels=p.labels) if click else Prompt(box=p.box)
        want = propagate_volume(None, image, {c: prompt}, modality="mr", backend="onnx",
                                export_dir=folder, **kw)  # fmt: skip
        extra = {"points": p.points * scale, "labels": p.labels} if click else {}
        low = runner.propagate_slices(inputs.__getitem__, len(image), c,
                                      box=(p.box.reshape(2, 2) * scale).reshape(4), **extra, **kw)  # fmt: skip
        got = upsample_logits(low, h, w) > 0
        assert got.shape == want.shape and _differ(got, want) <= 1e-3, kw
        assert got[c].any()
        if kw["direction"] == "none":
            assert not np.delete(got, c, 0).any()


def test_propagate_slices_errors_name_the_fix(model, tmp_path):
    from samed2_kit.deploy.export import export_onnx
    from samed2_kit.deploy.propagation import OnnxPropagation

    runner = OnnxPropagation(export_onnx(model, tmp_path / "onnx"))
    x = np.zeros((3, S, S), np.float32)
    box = np.array([10.0, 10, 50, 50])
    bad = [({"direction": "sideways"}, "direction='sideways': one of"),
           ({"start": 5}, r"start=5 is not in 0\.\.2"),
           ({"memory_frames": -1}, "memory_frames=-1: give an integer >= 0"),
           ({"box": None}, "give a box=")]  # fmt: skip
    for kw, message in bad:
        args = {"start": 1, "box": box} | kw
        with pytest.raises(ValueError, match=message):
            runner.propagate_slices(lambda z: x, 3, args.pop("start"), **args)
    with pytest.raises(ValueError, match="2 points but labels of shape"):
        runner.propagate_slices(lambda z: x, 3, 1, points=[[1, 2], [3, 4]], labels=[1])
