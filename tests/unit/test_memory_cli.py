"""`samed2 memory info|prune|export`: on banks made in Python (no model)."""

import csv
import json

import numpy as np
import pytest
import torch

from samed2_kit.cli import main
from samed2_kit.memory import ConfidenceMemory, Entry, MemoryConfig

MODEL = {"variant": "test-tiny", "image_size": 64}
# (confidence, task, case id) per entry, in insertion order
ROWS = [
    (0.95, "liver", "c1"),
    (0.55, "liver", "c2"),
    (0.80, "liver", "c3"),
    (0.70, "spleen", "c4"),
    (0.90, "spleen", "c5"),
    (0.60, "kidney", "c6"),
]


def _bank(path, capacity=8):
    gen = torch.Generator().manual_seed(0)
    bank = ConfidenceMemory(MemoryConfig(capacity=capacity, threshold=0.0), MODEL)
    for step, (conf, task, case) in enumerate(ROWS):
        key = torch.nn.functional.normalize(torch.randn(32, generator=gen), dim=0)
        feats = torch.randn(32, 4, 4, generator=gen)
        entry = Entry(key, feats, conf, modality="ct", task=task, case_id=case, step=step)
        assert bank.add(entry) == "inserted"
    bank.save(path)
    return bank


def _cases(path):
    bank = ConfidenceMemory.load(path, MODEL)
    return sorted(m["case_id"] for m in bank.meta), bank


def test_info_prints_partitions_and_facts(tmp_path, capsys):
    bank = _bank(tmp_path / "memory.safetensors")
    assert main(["memory", "info", str(tmp_path)]) == 0  # a folder holding the bank works too
    out = capsys.readouterr().out
    assert "| liver | 3 | 8 | 0.767 | 0.550 |" in out
    assert "| spleen | 2 | 8 | 0.800 | 0.700 |" in out
    assert "| kidney | 1 | 8 | 0.600 | 0.600 |" in out
    assert "entries: 6;" in out and f"bytes per entry: {bank.bytes_per_entry():,}" in out
    assert "key: 32 values" in out and "features: (32, 4, 4)" in out
    assert "test-tiny at 64 px" in out and "capacity=8" in out
    assert bank.digest() in out


def test_prune_min_conf_and_keep_per_partition(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    _bank(path)
    out = tmp_path / "pruned.safetensors"
    assert main(["memory", "prune", str(path), "--min-conf", "0.65", "--keep", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| liver | 3 | 1 |" in printed and "| all | 6 | 2 |" in printed
    cases, pruned = _cases(out)
    assert cases == ["c1", "c5"]  # the most confident >= 0.65 of liver and spleen; kidney: none
    assert [r["entries"] for r in pruned.table()] == [1, 1, 0]
    assert _cases(path)[0] == ["c1", "c2", "c3", "c4", "c5", "c6"]  # --out: BANK untouched
    # the pruned bank still works: read and write
    rows, valid = pruned.top_k(pruned.keys[:2], exclude_cases=["c1", "c5"])  # one per query
    assert valid.tolist() == [[True, False], [True, False]]
    assert rows[:, 0].tolist() == [1, 0]  # each query sees only the other case's entry
    key = torch.nn.functional.normalize(torch.randn(32), dim=0)
    assert pruned.add(Entry(key, torch.randn(32, 4, 4), 0.9, "ct", "kidney", "c7")) == "inserted"


def test_prune_in_place_drops_partitions(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    _bank(path)
    assert main(["memory", "prune", str(path), "--partition", "liver", "kidney"]) == 0
    cases, bank = _cases(path)
    assert cases == ["c4", "c5"]
    assert {r["partition"]: r["entries"] for r in bank.table()}["liver"] == 0
    assert main(["memory", "info", str(path)]) == 0
    assert "| spleen | 2 | 8 |" in capsys.readouterr().out


def test_prune_errors(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    _bank(path)
    before = path.read_bytes()
    assert main(["memory", "prune", str(path)]) == 2
    assert "nothing selected" in capsys.readouterr().err
    assert main(["memory", "prune", str(path), "--min-conf", "0.99"]) == 2
    assert "removes all 6 entries" in capsys.readouterr().err
    assert main(["memory", "prune", str(path), "--partition", "lung"]) == 2
    assert "no partition 'lung'" in capsys.readouterr().err
    assert path.read_bytes() == before
    # a training checkpoint's bank is hashed in its state.json: not replaced in place
    (tmp_path / "state.json").write_text(json.dumps({"files": {"memory.safetensors": "x"}}))
    assert main(["memory", "prune", str(path), "--keep", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["memory", "prune", str(path), "--keep", "1", "--out", str(tmp_path / "o")]) == 0


def test_prune_fixes_a_bank_over_capacity(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    bank = _bank(path)
    bank.cfg.capacity = 2  # as if saved with a larger capacity than its config says
    bank.save(path)
    with pytest.raises(ValueError, match="over its capacity"):
        ConfidenceMemory.load(path)
    assert main(["memory", "info", str(path)]) == 0  # still inspectable
    assert "3 (over capacity)" in capsys.readouterr().out
    assert main(["memory", "prune", str(path), "--min-conf", "0.5"]) == 2  # liver keeps 3 > 2
    assert "over capacity" in capsys.readouterr().err
    assert main(["memory", "prune", str(path), "--keep", "2"]) == 0
    assert _cases(path)[0] == ["c1", "c3", "c4", "c5", "c6"]


def test_export_csv_and_keys(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    bank = _bank(path)
    csv_path, npy = tmp_path / "out" / "entries.csv", tmp_path / "keys.npy"
    assert main(["memory", "export", str(path), "--out", str(csv_path), "--keys", str(npy)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["case_id"] for r in rows] == ["c1", "c2", "c3", "c4", "c5", "c6"]
    assert rows[3] == {"index": "3", "partition": "spleen", "modality": "ct", "task": "spleen",
                       "case_id": "c4", "confidence": "0.700000", "step": "3"}  # fmt: skip
    keys = np.load(npy)
    assert keys.dtype == np.float32 and keys.shape == (6, 32)
    np.testing.assert_array_equal(keys, bank.keys[:6].numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.npy", "memory.safetensors", "out"]


def test_bad_banks_exit_2_naming_the_file(tmp_path, capsys):
    path = tmp_path / "memory.safetensors"
    _bank(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for verb in (["info"], ["export", "--out", str(tmp_path / "e.csv")], ["prune", "--keep", "1"]):
        assert main(["memory", verb[0], str(path), *verb[1:]]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and "corrupt" in err
    assert path.read_bytes() == data[: len(data) // 2]
    missing = tmp_path / "nope.safetensors"
    assert main(["memory", "info", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    empty = tmp_path / "run"
    empty.mkdir()
    assert main(["memory", "info", str(empty)]) == 2
    assert "holds no memory.safetensors" in capsys.readouterr().err
