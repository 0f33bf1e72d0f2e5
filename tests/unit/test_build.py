import pickle

import pytest
import torch

from samed2_kit.model import build_model
from samed2_kit.model.build import (
    VARIANTS,
    guess_variant,
    model_config,
    read_state_dict,
    save_meta_checkpoint,
)


def test_test_tiny_is_small_and_runs_at_each_size():
    for size in (256, 512, 1024):
        m = build_model("test-tiny", image_size=size)
        n = sum(p.numel() for p in m.parameters())
        assert 1_000_000 <= n <= 2_000_000
        assert m.image_size == size
        assert m.sam.sam_prompt_encoder.image_embedding_size == (size // 16, size // 16)
    assert guess_variant(m.sam.state_dict()) == "test-tiny"


@pytest.mark.parametrize("variant", ["tiny", "small", "base_plus", "large"])
def test_meta_variant_configs(variant):
    cfg = model_config(variant, 512)
    assert cfg.model.image_size == 512
    assert list(cfg.model.memory_attention.layer.self_attention.feat_sizes) == [32, 32]
    assert cfg.model.sam_mask_decoder_extra_args["dynamic_multimask_via_stability"] is True


def test_bad_variant_and_size():
    with pytest.raises(ValueError, match="unknown model variant 'huge'"):
        build_model("huge")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("test-tiny", image_size=300)
    assert set(VARIANTS) == {"tiny", "small", "base_plus", "large", "test-tiny"}


def test_meta_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    a = build_model("test-tiny", image_size=256)
    path = save_meta_checkpoint(a.sam, tmp_path / "ckpt.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model"}
    torch.manual_seed(2)
    b = build_model("test-tiny", checkpoint=path, image_size=512, strict=True)
    assert b.load_report.ok
    for k, v in a.sam.state_dict().items():
        assert torch.equal(v, b.sam.state_dict()[k]), k


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    a = build_model("test-tiny", image_size=256)
    sd = a.sam.state_dict()
    dropped = "sam_mask_decoder.iou_token.weight"
    sd.pop(dropped)
    sd["extra.weight"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "partial.pt")
    b = build_model("test-tiny", checkpoint=tmp_path / "partial.pt", image_size=256)
    assert b.load_report.missing == [dropped]
    assert b.load_report.unexpected == ["extra.weight"]
    assert "1 missing keys" in caplog.text
    with pytest.raises(ValueError, match="missing keys"):
        build_model("test-tiny", checkpoint=tmp_path / "partial.pt", image_size=256, strict=True)


def test_checkpoint_of_another_variant_is_a_clear_error(tmp_path):
    tiny = build_model("tiny", image_size=256)
    save_meta_checkpoint(tiny.sam, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="'tiny' checkpoint but the model is 'test-tiny'"):
        build_model("test-tiny", checkpoint=tmp_path / "tiny.pt", image_size=256)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    sd = build_model("test-tiny", image_size=256).sam.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("image_encoder.trunk")}
    sd["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 32)
    torch.save({"model": sd}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="other shapes than the model"):
        build_model("test-tiny", checkpoint=tmp_path / "odd.pt", image_size=256)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(ValueError, match="code execution|not a readable torch file"):
            read_state_dict(p)


def test_non_checkpoint_files(tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="notes.pt"):
        read_state_dict(tmp_path / "notes.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        read_state_dict(tmp_path / "nothere.pt")
    torch.save({"model": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pt")
