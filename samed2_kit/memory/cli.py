"""`samed2 memory info|prune|export BANK`: inspect and manage a saved confidence-memory bank.

BANK is a `memory.safetensors` file, or a folder holding one (a run folder written by `samed2
train`, or one of its `checkpoints/step-*` folders).
"""

from __future__ import annotations

import sys
from pathlib import Path

BANK_HELP = "memory.safetensors, or a run / checkpoint folder holding one"


def bank_path(arg: str | Path) -> Path:
    """The bank file named by BANK (a file, or a folder with memory.safetensors in it)."""
    from samed2_kit.memory.module import MEMORY_FILE

    path = Path(arg)
    if path.is_dir():
        if (path / MEMORY_FILE).is_file():
            return path / MEMORY_FILE
        found = sorted(path.glob(f"checkpoints/step-*/{MEMORY_FILE}"))
        hint = f" (the newest checkpoint's is {found[-1]})" if found else ""
        raise FileNotFoundError(
            f"{path} holds no {MEMORY_FILE}{hint}: pass the bank file or a folder holding one "
            "(a run trained with memory, or one of its checkpoints/step-* folders)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"memory bank {path} does not exist: pass a {MEMORY_FILE} file "
                                "or a run / checkpoint folder holding one")  # fmt: skip
    return path


def load_bank(path: Path):
    """ConfidenceMemory.load, but a bank over its configured capacity still loads (to be
    inspected or pruned): the capacity check runs against a relaxed copy of the bank's own
    config, which is put back afterwards. Everything else (schema, consistency) is checked as
    usual."""
    import dataclasses
    import json

    from safetensors import safe_open

    from samed2_kit.config import from_dict
    from samed2_kit.memory.bank import ConfidenceMemory, MemoryConfig

    try:
        with safe_open(str(path), "pt") as f:
            header = json.loads((f.metadata() or {})["samed2_memory"])
        cfg = from_dict(MemoryConfig, header["config"], "memory", str(path))
    except Exception:  # let load() say what is wrong with the file
        return ConfidenceMemory.load(path)
    relaxed = dataclasses.replace(cfg, capacity=2**62, capacities={})
    bank = ConfidenceMemory.load(path, cfg=relaxed)
    bank.cfg = cfg
    return bank


def over_capacity(bank) -> list[dict]:
    """Partition rows of `bank.table()` holding more entries than their capacity."""
    return [row for row in bank.table() if row["entries"] > row["capacity"]]


def _fmt_conf(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"  # nan: an empty partition


def info_lines(bank, path: Path) -> list[str]:
    """What `samed2 memory info` prints: a Markdown table per partition, then the bank's facts."""
    from dataclasses import asdict

    model = bank.model
    who = f"{model.get('variant', '?')} at {model.get('image_size', '?')} px" if model else "?"
    lines = [f"memory bank {path} ({path.stat().st_size:,} bytes on disk), written by {who}", ""]
    lines += ["| partition | entries | capacity | mean conf | min conf |",
              "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for row in bank.table():
        flag = " (over capacity)" if row["entries"] > row["capacity"] else ""
        lines.append(f"| {row['partition']} | {row['entries']}{flag} | {row['capacity']} | "
                     f"{_fmt_conf(row['mean_conf'])} | {_fmt_conf(row['min_conf'])} |")  # fmt: skip
    if not bank.partitions:
        lines.append("| (none) | 0 | - | - | - |")
    per = bank.bytes_per_entry()
    lines.append("")
    lines.append(f"entries: {len(bank)}; bytes per entry: {per:,} ({per * len(bank) / 2**20:.2f} "
                 "MiB for all entries)")  # fmt: skip
    if bank.keys is not None:
        feats = tuple(bank.features.shape[1:])
        lines.append(f"key: {bank.keys.shape[1]} values (float32); features: {feats} (bfloat16)")
    else:
        lines.append("key: -; features: - (empty bank)")
    cfg = ", ".join(f"{k}={v}" for k, v in asdict(bank.cfg).items())
    lines.append(f"config: {cfg}")
    lines.append(f"digest: {bank.digest()}")
    return lines


def cmd_info(args) -> int:
    path = bank_path(args.bank)
    bank = load_bank(path)
    print("\n".join(info_lines(bank, path)))
    over = over_capacity(bank)
    if over:
        names = ", ".join(repr(r["partition"]) for r in over)
        print(f"[memory] partition(s) {names} over capacity: training will refuse this bank; "
              f"`samed2 memory prune {args.bank} --keep N` fixes it", file=sys.stderr)  # fmt: skip
    return 0


def select_rows(bank, min_conf: float | None, keep: int | None, drop: list[str]):
    """Rows (ascending) surviving the prune: not in a dropped partition, confidence >= min_conf,
    then per partition the `keep` most confident (ties: the older row)."""
    import torch

    n = len(bank)
    if not n:
        return torch.zeros(0, dtype=torch.int64)
    mask = torch.ones(n, dtype=torch.bool)
    for name in drop:
        mask[bank.members(name)] = False
    if min_conf is not None:
        mask &= bank.conf[:n] >= min_conf
    if keep is not None:
        for name in bank.partitions:
            rows = bank.members(name)
            rows = rows[mask[rows]]
            order = torch.sort(bank.conf[rows], descending=True, stable=True).indices
            mask[rows[order[keep:]]] = False
    return torch.nonzero(mask).flatten()


def _in_checkpoint(path: Path) -> bool:
    """Is `path` a file whose sha256 a training checkpoint's state.json records?"""
    import json

    state = path.parent / "state.json"
    try:
        return path.name in json.loads(state.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return False


def _record_digest(path: Path) -> None:
    """When the run folder's model.json records the sha256 of `path` (`files`), record the new
    one, so that the folder still loads after the bank was pruned in place."""
    import json

    from samed2_kit.utils.atomic import sha256_file, write_text

    manifest = path.parent / "model.json"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, dict) and path.name in files:
        files[path.name] = sha256_file(path)
        write_text(manifest, json.dumps(meta, indent=2, default=str))


def cmd_prune(args) -> int:
    from samed2_kit.memory.module import MEMORY_FILE

    path = bank_path(args.bank)
    if args.min_conf is None and args.keep is None and not args.partition:
        raise ValueError(f"samed2 memory prune {args.bank}: nothing selected to prune: give "
                         "--min-conf C, --keep N and/or --partition NAME")  # fmt: skip
    if args.keep is not None and args.keep < 1:
        raise ValueError(f"--keep {args.keep}: keep at least 1 entry per partition")
    out = Path(args.out) if args.out else path
    if out.is_dir():
        out = out / MEMORY_FILE
    if out.resolve() == path.resolve() and _in_checkpoint(path):
        raise ValueError(
            f"{path} belongs to a training checkpoint (its sha256 is in {path.parent / 'state.json'}"
            "; --resume would refuse a changed file): write the pruned bank elsewhere with --out"
        )
    bank = load_bank(path)
    unknown = [p for p in args.partition if p not in bank.partitions]
    if unknown:
        raise ValueError(f"memory bank {path} has no partition {', '.join(map(repr, unknown))}: "
                         f"it has {', '.join(map(repr, bank.partitions)) or 'none'}")  # fmt: skip
    before = {r["partition"]: r["entries"] for r in bank.table()}
    total = len(bank)
    if not total:
        raise ValueError(f"memory bank {path} is empty: nothing to prune")
    rows = select_rows(bank, args.min_conf, args.keep, args.partition)
    if not len(rows):
        raise ValueError(
            f"pruning memory bank {path} this way removes all {total} entries: lower --min-conf"
            " or drop fewer partitions (to start from an empty bank, delete the file instead)"
        )
    bank.keep(rows)
    over = over_capacity(bank)
    if over:
        worst = ", ".join(f"{r['partition']!r} {r['entries']}/{r['capacity']}" for r in over)
        raise ValueError(f"memory bank {path}: after pruning, partitions over capacity ({worst}); "
                         "nothing written: add --keep N with N <= the capacity")  # fmt: skip
    bank.save(out)
    _record_digest(out)
    print("| partition | before | after |\n| --- | ---: | ---: |")
    for row in bank.table():
        print(f"| {row['partition']} | {before.get(row['partition'], 0)} | {row['entries']} |")
    print(f"| all | {total} | {len(bank)} |")
    print(f"[memory] wrote {out}: {total - len(bank)} of {total} entries removed; "
          f"digest {bank.digest()[:16]}")  # fmt: skip
    return 0


def export_rows(bank) -> list[list]:
    """One row per entry: index, partition, modality, task, case_id, confidence, step."""
    rows = []
    for i, meta in enumerate(bank.meta):
        rows.append([i, bank.partitions[int(bank.part[i])], meta.get("modality", ""),
                     meta.get("task", ""), meta.get("case_id", ""),
                     f"{float(bank.conf[i]):.6f}", int(bank.step[i])])  # fmt: skip
    return rows


def cmd_export(args) -> int:
    import csv
    import io

    import numpy as np

    from samed2_kit.utils.atomic import atomic_path, write_text

    path = bank_path(args.bank)
    bank = load_bank(path)
    if not len(bank):
        raise ValueError(f"memory bank {path} is empty: nothing to export")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "partition", "modality", "task", "case_id", "confidence", "step"])
    writer.writerows(export_rows(bank))
    write_text(args.out, buf.getvalue())
    wrote = [args.out]
    if args.keys:
        keys = bank.keys[: len(bank)].float().numpy()
        with atomic_path(args.keys) as tmp, open(tmp, "wb") as f:  # np.save(name) adds ".npy"
            np.save(f, keys)
        wrote.append(f"{args.keys} {keys.shape} float32")
    print(f"[memory] exported {len(bank)} entries of {path}: {', '.join(map(str, wrote))}")
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("memory", help="inspect and manage a saved memory bank (info/prune/export)")
    verbs = m.add_subparsers(dest="verb", required=True)
    i = verbs.add_parser("info", help="partitions, sizes, model, config and digest of a bank")
    i.add_argument("bank", help=BANK_HELP)
    i.set_defaults(func=cmd_info)
    p = verbs.add_parser("prune", help="drop entries by confidence, count or partition")
    p.add_argument("bank", help=BANK_HELP)
    p.add_argument("--min-conf", type=float, help="drop entries less confident than this")
    p.add_argument("--keep", type=int, help="keep the N most confident entries per partition")
    p.add_argument("--partition", action="extend", nargs="+", default=[], metavar="NAME",
                   help="drop every entry of these partitions")  # fmt: skip
    p.add_argument("--out", help="write the pruned bank here (default: replace BANK, atomically)")
    p.set_defaults(func=cmd_prune)
    e = verbs.add_parser("export", help="entries' metadata as CSV (and keys as .npy)")
    e.add_argument("bank", help=BANK_HELP)
    e.add_argument("--out", required=True, help="CSV file: one row per entry")
    e.add_argument("--keys", help=".npy file for the keys, (entries, key dim) float32")
    e.set_defaults(func=cmd_export)
