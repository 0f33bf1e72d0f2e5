"""The confidence-driven memory bank (SAMed-2), as data: entries, write policy, top-k read, files.

An entry: a compact key (the image embedding average-pooled to g x g, projected to `key_dim`
values by a fixed seeded Gaussian matrix, L2-normalised; float32), the memory-encoder features of the prediction (mem_dim, h, w) in bf16, a
confidence in [0, 1] (the predicted IoU, one sigmoid; optionally times the stability score), and
metadata (modality, task, case id, training step). Entries live in partitions (per task, per
modality, or one), each with a capacity.

Write (`add`): only confidence >= threshold; insert while the partition has room; when full,
- "nearest" (SAMed-2): replace the partition's entry nearest to the new key if the new one is
  more confident, else drop it;
- "diversity" (MedSAM-2): i = the entry least similar to the new one, j = the entry most similar
  to i; replace j if sim(new, i) < sim(i, j) and confidence_new > confidence_j - 0.1.
Read (`top_k`): score = cosine(query, key) + conf_weight * confidence over every entry (or one
partition), excluding the query's own case when asked; the k best, best first.

Storage grows by doubling, so 100k entries cost one matrix product per read. Files: one
safetensors file whose header holds the JSON (schema version, model, shapes, partitions, per-entry
metadata, the sha256 of the entries: `digest()`); written atomically; loaded without pickle, all
or nothing: a damaged file (digest differs) or non-finite keys, features or confidences are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from samed2_kit.config import MemoryConfig

SCHEMA_VERSION = 1


@dataclass
class Entry:
    """One candidate entry. key (D,) float32 L2-normalised; features (mem_dim, h, w)."""

    key: torch.Tensor
    features: torch.Tensor
    confidence: float
    modality: str = ""
    task: str = ""
    case_id: str = ""
    step: int = 0


def _finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return math.isfinite(float(x))


def case_code(case_id: str) -> int:
    """A stable int64 for a case id (to exclude a query's own case with tensor ops)."""
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:8], "little", signed=True)


class ConfidenceMemory:
    """The bank. `model` ({"variant", "image_size"}) names what wrote it, checked on load."""

    def __init__(self, cfg: MemoryConfig, model: dict | None = None) -> None:
        self.cfg, self.model = cfg, dict(model or {})
        self.n = 0
        self.keys = self.features = self.conf = self.case = self.step = self.part = None
        self.partitions: list[str] = []
        self.counts: dict[str, int] = {}  # entries per partition
        self.meta: list[dict] = []

    # -- storage -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    def _alloc(self, entry: Entry, need: int) -> None:
        if self.keys is not None and need <= len(self.keys):
            return
        cap = max(16, need, 2 * (len(self.keys) if self.keys is not None else 0))
        new = {
            "keys": torch.zeros(cap, entry.key.numel()),
            "features": torch.zeros(cap, *entry.features.shape, dtype=torch.bfloat16),
            "conf": torch.zeros(cap),
            "case": torch.zeros(cap, dtype=torch.int64),
            "step": torch.zeros(cap, dtype=torch.int64),
            "part": torch.zeros(cap, dtype=torch.int64),
        }
        for name, t in new.items():
            old = getattr(self, name)
            if old is not None:
                t[: self.n] = old[: self.n]
            setattr(self, name, t)

    def _check(self, entry: Entry) -> None:
        if self.n and (entry.key.numel() != self.keys.shape[1]
                       or tuple(entry.features.shape) != tuple(self.features.shape[1:])):  # fmt: skip
            raise ValueError(
                f"memory entry has key {entry.key.numel()} / features {tuple(entry.features.shape)}"
                f", the bank {self.keys.shape[1]} / {tuple(self.features.shape[1:])}: a bank "
                "holds one model's entries at one image size"
            )

    def partition_of(self, modality: str, task: str) -> str:
        by = self.cfg.partition_by
        return {"task": task, "modality": modality, "none": "all"}[by] or "unknown"

    def _part_index(self, name: str) -> int:
        if name not in self.partitions:
            self.partitions.append(name)
        return self.partitions.index(name)

    def _put(self, i: int, e: Entry, part: int) -> None:
        self.keys[i] = e.key.reshape(-1).float()
        self.features[i] = e.features.to(torch.bfloat16)
        self.conf[i], self.case[i], self.step[i] = e.confidence, case_code(e.case_id), e.step
        self.part[i] = part
        meta = {"modality": e.modality, "task": e.task, "case_id": e.case_id}
        if i == len(self.meta):
            self.meta.append(meta)
        else:
            self.meta[i] = meta

    def members(self, partition: str) -> torch.Tensor:
        """Row indices of a partition's entries."""
        if partition not in self.partitions or not self.n:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero(self.part[: self.n] == self.partitions.index(partition)).flatten()

    # -- write ---------------------------------------------------------------------------------
    def add(self, e: Entry) -> str:
        """Apply the write policy to one candidate; returns "inserted", "replaced", "dropped"
        (kept: a replaced entry), "below threshold" or "not finite" (NaN/inf in its confidence,
        key or features: never written, a saved bank holding them is refused)."""
        if not (_finite(e.confidence) and _finite(e.key) and _finite(e.features)):
            return "not finite"
        if e.confidence < self.cfg.threshold:
            return "below threshold"
        self._check(e)
        name = self.partition_of(e.modality, e.task)
        if self.counts.get(name, 0) < self.cfg.capacity_of(name):
            self._alloc(e, self.n + 1)
            self._put(self.n, e, self._part_index(name))
            self.n += 1
            self.counts[name] = self.counts.get(name, 0) + 1
            return "inserted"
        target = self._victim(e, self.members(name))
        if target is None:
            return "dropped"
        self._put(int(target), e, self._part_index(name))
        return "replaced"

    def _victim(self, e: Entry, rows: torch.Tensor) -> int | None:
        keys, conf = self.keys[rows], self.conf[rows]
        sim = keys @ e.key.reshape(-1).float()
        if self.cfg.replace == "nearest":
            j = int(torch.argmax(sim))
            return int(rows[j]) if e.confidence > float(conf[j]) else None
        i = int(torch.argmin(sim))
        to_i = keys @ keys[i]
        to_i[i] = -float("inf")
        j = int(torch.argmax(to_i))
        if float(sim[i]) < float(to_i[j]) and e.confidence > float(conf[j]) - 0.1:
            return int(rows[j])
        return None

    # -- read ----------------------------------------------------------------------------------
    def top_k(
        self,
        queries: torch.Tensor,
        exclude_cases: list[str] | None = None,
        partitions: list[str] | None = None,
        k: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best entries for each query key (Q, D): (indices (Q, k), valid (Q, k) bool), best first.

        `exclude_cases[q]`: a case id whose entries query q must not see (training); `partitions[q]`
        limits query q to one partition (read_scope "partition"). Invalid slots: too few entries."""
        k = k or self.cfg.top_k
        q = queries.reshape(len(queries), -1).float()
        if not self.n:
            empty = torch.zeros(len(q), 0, dtype=torch.int64)
            return empty, empty.bool()
        if q.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"memory: query keys have {q.shape[1]} values, the bank's {self.keys.shape[1]}: "
                "it was written with another model, memory.key_pool or memory.key_dim"
            )
        # keys @ q.T (then transposed) reads the (N, D) keys row-major: ~4x faster than q @ keys.T
        score = (self.keys[: self.n] @ q.T).T + self.cfg.conf_weight * self.conf[: self.n]
        if exclude_cases is not None:
            codes = torch.tensor([case_code(c) for c in exclude_cases])
            score[codes[:, None] == self.case[: self.n][None]] = -float("inf")
        if partitions is not None:
            idx = torch.tensor([self.partitions.index(p) if p in self.partitions else -1
                                for p in partitions])  # fmt: skip
            score[idx[:, None] != self.part[: self.n][None]] = -float("inf")
        vals, rows = torch.topk(score, min(k, self.n), dim=1)
        return rows, torch.isfinite(vals)

    # -- inspection, files ---------------------------------------------------------------------
    def table(self) -> list[dict]:
        """One summary per partition: entries, capacity, mean/min confidence."""
        out = []
        for name in self.partitions:
            rows = self.members(name)
            c = self.conf[rows] if len(rows) else torch.zeros(0)
            out.append({"partition": name, "entries": len(rows),
                        "capacity": self.cfg.capacity_of(name),
                        "mean_conf": float(c.mean()) if len(c) else float("nan"),
                        "min_conf": float(c.min()) if len(c) else float("nan")})  # fmt: skip
        return out

    def bytes_per_entry(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.shape[1] * 4 + self.features[0].numel() * 2 + 4 + 8 + 8 + 8

    def digest(self) -> str:
        """sha256 of every entry (tensors and metadata): equal banks, equal digests."""
        h = hashlib.sha256()
        for t in self._tensors().values():
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(json.dumps([self.partitions, self.meta]).encode())
        return h.hexdigest()

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = ("keys", "features", "conf", "case", "step", "part")
        if self.keys is None:
            return {}
        return {name: getattr(self, name)[: self.n].contiguous() for name in names}

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the entries at `rows` (in that order); the rest are dropped."""
        rows = rows.to(torch.int64)
        for name, t in self._tensors().items():
            getattr(self, name)[: len(rows)] = t[rows]
        self.meta = [self.meta[int(i)] for i in rows]
        self.n = len(rows)
        self._recount()

    def _recount(self) -> None:
        self.counts = {name: len(self.members(name)) for name in self.partitions}

    def save(self, path: str | Path) -> Path:
        """One safetensors file (tensors + JSON header), written atomically."""
        from safetensors.torch import save_file

        from samed2_kit.utils.atomic import atomic_path

        header = {"schema_version": SCHEMA_VERSION, "model": self.model, "config": asdict(self.cfg),
                  "partitions": self.partitions, "entries": self.meta,
                  "digest": self.digest()}  # fmt: skip
        tensors = self._tensors() or {"keys": torch.zeros(0, 1)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"samed2_memory": json.dumps(header)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, model: dict | None = None, cfg: MemoryConfig | None = None):
        """Read a bank file; `model` (variant, image_size) and `cfg` (capacities) are checked
        when given. Raises ValueError naming the file and the fix; never returns half a bank."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                header = json.loads((f.metadata() or {})["samed2_memory"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated, not safetensors, no header
            raise ValueError(f"memory bank {path} is corrupt or not a samed2 bank ({e}): "
                             "restore it from a checkpoint or start with an empty bank") from e  # fmt: skip
        if header.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"memory bank {path}: schema {header.get('schema_version')!r}, this "
                             f"samed2-kit reads {SCHEMA_VERSION}")  # fmt: skip
        if model and header["model"] != model:
            raise ValueError(
                f"memory bank {path} was written by {header['model']}, this model is {model}: "
                "a bank only works with the model (variant, image size) that wrote it"
            )
        from samed2_kit.utils.dataconf import from_dict

        bank = cls(cfg or from_dict(MemoryConfig, header["config"], "memory", str(path)),
                   header["model"])  # fmt: skip
        n = len(header["entries"])
        if n:
            shapes = {k: len(v) for k, v in tensors.items()}
            if set(shapes) != {"keys", "features", "conf", "case", "step", "part"} or set(
                shapes.values()
            ) != {n}:
                raise ValueError(f"memory bank {path}: {n} entries in the header, tensors {shapes}"
                                 ": the file is inconsistent; restore it from a checkpoint")  # fmt: skip
            for name, t in tensors.items():
                setattr(bank, name, t.clone())
        bank.n, bank.partitions, bank.meta = n, list(header["partitions"]), list(header["entries"])
        _check_contents(bank, header.get("digest"), path)
        bank._recount()
        for row in bank.table():
            if row["entries"] > row["capacity"]:
                raise ValueError(
                    f"memory bank {path}: partition {row['partition']!r} holds {row['entries']} "
                    f"entries, over its capacity {row['capacity']}: raise memory.capacity (or "
                    f"memory.capacities.{row['partition']}) or `samed2 memory prune` the bank"
                )
        return bank


def _check_contents(bank: ConfidenceMemory, digest: str | None, path: Path) -> None:
    """A loaded bank's entries against the digest its header records (banks saved before digests
    were recorded have none), and its float tensors for NaN/inf; ValueError naming the file."""
    fix = "restore it from a checkpoint, or delete it to start with an empty bank"
    if digest is not None and bank.digest() != digest:
        raise ValueError(f"memory bank {path} is damaged: its entries do not match the sha256 in "
                         f"its header: {fix}")  # fmt: skip
    for name in ("keys", "features", "conf"):
        t = getattr(bank, name)
        if t is not None and t.numel() and not bool(torch.isfinite(t.float()).all()):
            bad = int((~torch.isfinite(t.float())).reshape(len(t), -1).any(1).sum())
            raise ValueError(f"memory bank {path}: {name} of {bad} entries hold NaN or inf "
                             f"(a diverged run wrote them): {fix}")  # fmt: skip
