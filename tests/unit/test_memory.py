"""The confidence memory: write policy, read, files, and how the model uses it."""

import copy

import pytest
import torch
import torch.nn.functional as F

from samed2_kit.memory import ConfidenceMemory, Entry, MemoryConfig, attach_memory
from samed2_kit.model import Prompts, build_model

MODEL = {"variant": "test-tiny", "image_size": 64}


def _key(*values):
    v = torch.zeros(8)
    v[: len(values)] = torch.tensor(values, dtype=torch.float32)
    return F.normalize(v, dim=0)


def _e(key, conf, task="t", case="c0", modality="ct"):
    return Entry(key, torch.full((4, 2, 2), conf), conf, modality, task, case, 0)


def _bank(**cfg):
    return ConfidenceMemory(MemoryConfig(**{"threshold": 0.5, "capacity": 2, **cfg}), MODEL)


def test_threshold_insert_then_replace_the_nearest_only_if_more_confident():
    b = _bank()
    assert b.add(_e(_key(1, 0), 0.4)) == "below threshold"
    assert b.add(_e(_key(1, 0), 0.6)) == "inserted"
    assert b.add(_e(_key(0, 1), 0.7)) == "inserted"
    assert b.add(_e(_key(1, 0.1), 0.55)) == "dropped"  # nearest (1, 0) is more confident
    assert b.add(_e(_key(1, 0.1), 0.9)) == "replaced"
    assert sorted(round(float(c), 2) for c in b.conf[: len(b)]) == [0.7, 0.9]
    assert float(b.conf[0]) == pytest.approx(0.9)  # (1, 0) was the one replaced


def test_diversity_rule_replaces_within_the_tightest_pair():
    b = _bank(replace="diversity", capacity=3)
    for k in (_key(1, 0), _key(1, 0.05), _key(0, 1)):
        b.add(_e(k, 0.8))
    # new entry far from everything: i = least similar to it, j = i's nearest; replaced if
    # sim(new, i) < sim(i, j) and conf_new > conf_j - 0.1
    assert b.add(_e(_key(-1, -1), 0.75)) == "replaced"
    assert b.add(_e(_key(-1, -1), 0.2)) == "below threshold"


def test_partitions_have_their_own_capacity():
    b = _bank(capacity=1, capacities={"us": 2}, partition_by="modality")
    assert b.add(_e(_key(1), 0.9, modality="ct")) == "inserted"
    assert b.add(_e(_key(0, 1), 0.6, modality="ct")) == "dropped"
    assert [b.add(_e(_key(0, 0, 1), 0.9, modality="us")) for _ in range(3)][:2] == ["inserted"] * 2
    assert {r["partition"]: r["entries"] for r in b.table()} == {"ct": 1, "us": 2}


def test_top_k_by_cosine_plus_confidence_excluding_the_own_case():
    b = _bank(capacity=10, conf_weight=0.5)
    b.add(_e(_key(1, 0), 0.6, case="a"))
    b.add(_e(_key(1, 0.2), 1.0, case="b"))  # a little less similar, much more confident
    b.add(_e(_key(0, 1), 1.0, case="c", task="other"))
    rows, valid = b.top_k(_key(1, 0)[None], k=2)
    assert rows[0].tolist() == [1, 0] and valid.all()
    rows, valid = b.top_k(_key(1, 0)[None], exclude_cases=["b"], k=3)
    assert 1 not in rows[0][valid[0]].tolist() and valid[0].tolist() == [True, True, False]
    b.cfg.read_scope = "partition"
    rows, valid = b.top_k(_key(1, 0)[None], partitions=["other"], k=3)
    assert rows[0][valid[0]].tolist() == [2]


def test_save_load_round_trip_and_clear_errors(tmp_path):
    b = _bank(capacity=3)
    for i in range(3):
        b.add(_e(_key(1, i), 0.6 + 0.1 * i, case=f"c{i}"))
    path = b.save(tmp_path / "memory.safetensors")
    back = ConfidenceMemory.load(path, MODEL)
    assert back.digest() == b.digest() and back.table() == b.table()
    with pytest.raises(ValueError, match="written by .*test-tiny.*only works with the model"):
        ConfidenceMemory.load(path, {"variant": "tiny", "image_size": 1024})
    with pytest.raises(ValueError, match="over its capacity 2: raise memory.capacity"):
        ConfidenceMemory.load(path, MODEL, MemoryConfig(capacity=2))
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match="cut.safetensors is corrupt"):
        ConfidenceMemory.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="memory.capacity=0 must be >= 1"):
        MemoryConfig(capacity=0)


def test_a_100k_entry_bank_works(tmp_path):
    b = _bank(capacity=100_000, threshold=0.0)
    keys = F.normalize(torch.randn(100_000, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    feat = torch.zeros(4, 1, 1)
    for i in range(100_000):
        b.add(Entry(keys[i], feat, 0.5, "ct", "t", f"c{i % 97}", i))
    rows, valid = b.top_k(keys[:3], exclude_cases=["c1", "c2", "c3"])
    assert rows[:, 0].tolist() == [0, 1, 2] and valid.all()  # itself: not excluded (case c0..)
    back = ConfidenceMemory.load(b.save(tmp_path / "big.safetensors"))
    assert len(back) == 100_000 and back.digest() == b.digest()


def _images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 64, 64, generator=g), Prompts(
        boxes=torch.tensor([[8.0, 8, 40, 40]] * 2)
    )


def _filled_model(case="a"):
    torch.manual_seed(0)
    model = build_model("test-tiny", image_size=64).eval()
    mem = attach_memory(model, MemoryConfig(threshold=0.0, top_k=2))
    x, p = _images()
    with torch.no_grad():
        out = model(x, p)
        entries = mem.entries_from(model.sam, out, {"case_id": [case, case], "task": ["t", "t"]}, 1)
    with pytest.raises(RuntimeError, match="read-only"):
        mem.commit([entries])
    mem.writing = True
    assert mem.commit([entries]) == {"inserted": 2}
    mem.writing = False
    return model, x, p


def test_empty_bank_equals_no_memory_and_entries_condition_the_features():
    model, x, p = _filled_model()
    with torch.no_grad():
        with_entries = model(x, p).low_res_logits
        bank = model.memory.bank
        model.memory.bank = ConfidenceMemory(bank.cfg, bank.model)
        empty = model(x, p).low_res_logits
        model.memory = None
        plain = model(x, p).low_res_logits
    assert torch.equal(empty, plain)
    assert not torch.allclose(with_entries, plain)


def test_training_never_retrieves_the_own_case():
    model, x, p = _filled_model(case="a")
    meta = {"case_id": ["a", "a"]}
    with torch.no_grad():
        model.train()
        own = model(x, p, meta=meta).low_res_logits
        other = model(x, p, meta={"case_id": ["b", "b"]}).low_res_logits
        model.memory = None
        plain = model(x, p, meta=meta).low_res_logits
    assert torch.equal(own, plain) and not torch.allclose(other, plain)


def test_evaluation_and_the_predictor_never_change_the_bank(hc18_store):
    from samed2_kit.config import EvalConfig
    from samed2_kit.engine.evaluate import evaluate
    from samed2_kit.engine.items import items_from_store
    from samed2_kit.model.predictor import Predictor

    model, x, p = _filled_model()
    before = model.memory.bank.digest()
    state = copy.deepcopy(model.state_dict())
    evaluate(model, items_from_store(hc18_store, "test"), EvalConfig(), progress=False)
    pred = Predictor(model)
    pred.set_image((x[0].permute(1, 2, 0).numpy() * 40 + 120).clip(0, 255).astype("uint8"))
    pred.predict(box=[5, 5, 30, 30])
    assert model.memory.bank.digest() == before and len(model.memory.bank) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_an_emptied_bank_loads_and_keys_of_another_width_are_refused(tmp_path):
    b = _bank()
    b.add(_e(_key(1), 0.9))
    b.keep(torch.zeros(0, dtype=torch.int64))
    back = ConfidenceMemory.load(b.save(tmp_path / "empty.safetensors"))
    assert len(back) == 0 and back.table()[0]["entries"] == 0
    b.add(_e(_key(1), 0.9))
    with pytest.raises(ValueError, match="another model, memory.key_pool or memory.key_dim"):
        b.top_k(torch.ones(1, 16))
