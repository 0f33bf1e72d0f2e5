"""Benchmark: the confidence memory (SAMed-2) — read latency, bytes per entry, training overhead.

1. top-k latency against bank size (1k, 10k, 100k entries): `bank.top_k` for a batch of 4 query
   keys, k=4, excluding 4 case ids (as training reads), median of many calls; and the time to fill
   the bank with `add` (per entry). Goal: <= 5 ms at 100k on CPU.
2. bytes per entry at 256/512/1024 px: `bank.bytes_per_entry()` and the file size per entry of a
   saved 8-entry bank; at --real-size (1024) the entry comes from a real forward of the model
   (`candidates`). Goal: <= 0.6 MB at 1024 px.
3. training-step overhead: forward + Dice/BCE + backward + AdamW step (+ candidates + commit, as
   the training loop does) with memory at k=4 and a pre-filled bank, against the same model
   without memory and against sam2's modules called directly (tests/_reference.py's direct_sam2); median
   of repeats run alternately. Goal: <= 1.25x.

    .venv/bin/python bench/bench_memory.py [--sizes 1000,10000,100000] [--key-dims 256,64]
        [--real-size 1024] [--step-size 256] [--batch 4] [--ks 1,4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import alternate

from samed2_kit.memory import ConfidenceMemory, Entry, MemoryConfig, attach_memory
from samed2_kit.memory.bank import case_code
from samed2_kit.model import Prompts, build_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests._reference: the plain SAM 2 forward

MODEL_ID = {"variant": "bench", "image_size": 1024}


def random_entry(gen, key_dim: int, feat_shape, case: str, step: int) -> Entry:
    key = F.normalize(torch.randn(key_dim, generator=gen), dim=0)
    feats = torch.randn(*feat_shape, generator=gen).to(torch.bfloat16)
    conf = 0.5 + 0.5 * float(torch.rand((), generator=gen))
    return Entry(key, feats, conf, "ct", f"task{step % 4}", case, step)


def fill(bank: ConfidenceMemory, n: int, key_dim: int, feat_shape, budget_s: float) -> dict:
    """Add n random entries (one case per 8 entries) with `add`; past `budget_s` seconds the rest
    goes in by bulk assignment of the bank's tensors. Returns how many went which way and the
    seconds per `add`."""
    gen = torch.Generator().manual_seed(0)
    t0, added, in_add = time.perf_counter(), 0, 0.0
    while added < n and time.perf_counter() - t0 < budget_s:
        entry = random_entry(gen, key_dim, feat_shape, f"case{added // 8}", added)
        t = time.perf_counter()
        outcome = bank.add(entry)
        in_add += time.perf_counter() - t
        assert outcome == "inserted", outcome
        added += 1
    per_add = in_add / max(added, 1)
    rest = n - added
    if rest:  # bulk: what `add` would write for the same entries (all inserted: capacity >= n)
        e = random_entry(gen, key_dim, feat_shape, "x", 0)
        bank._alloc(e, n)
        keys = F.normalize(torch.randn(rest, key_dim, generator=gen), dim=1)
        bank.keys[added:n] = keys
        bank.features[added:n] = torch.randn(rest, *feat_shape, generator=gen).to(torch.bfloat16)
        bank.conf[added:n] = 0.5 + 0.5 * torch.rand(rest, generator=gen)
        bank.case[added:n] = torch.tensor([case_code(f"case{i // 8}") for i in range(added, n)])
        bank.step[added:n] = torch.arange(added, n)
        names = [bank.partition_of("ct", f"task{i % 4}") for i in range(added, n)]
        bank.part[added:n] = torch.tensor([bank._part_index(name) for name in names])
        bank.meta += [{"modality": "ct", "task": f"task{i % 4}", "case_id": f"case{i // 8}"}
                      for i in range(added, n)]  # fmt: skip
        bank.n = n
        if hasattr(bank, "_recount"):
            bank._recount()
    return {"added": added, "bulk": rest, "per_add_s": per_add}


def bench_topk(sizes: list[int], key_dims: list[int], calls: int, budget_s: float) -> None:
    feat_shape = (64, 1, 1)
    print("## 1. top-k read latency against bank size\n")
    print(f"`bank.top_k(queries (4, D), exclude_cases=[4 case ids])`, k=4, median of {calls} calls; "
          f"{torch.get_num_threads()} threads. Entries' features are {feat_shape} bf16 to keep "
          "100k entries in RAM: a read scores keys only (one (4, D) x (D, N) product + top-k) "
          "and touches no features, so its latency does not depend on the feature size. Fill: "
          f"`add` per entry within a {budget_s:.0f} s budget per bank, bulk assignment of the "
          "bank's tensors past it (column `filled by`).\n")  # fmt: skip
    print("| entries | key dim | top-k median (ms) | p90 (ms) | add per entry (us) | filled by "
          "| goal <= 5 ms |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | --- | --- |")
    gen = torch.Generator().manual_seed(1)
    for d in key_dims:
        for n in sizes:
            bank = ConfidenceMemory(MemoryConfig(capacity=n, threshold=0.0, partition_by="none"),
                                    MODEL_ID)  # fmt: skip
            how = fill(bank, n, d, feat_shape, budget_s)
            assert len(bank) == n
            queries = F.normalize(torch.randn(4, d, generator=gen), dim=1)
            exclude = ["case0", "case1", "case2", "case3"]
            rows, valid = bank.top_k(queries, exclude_cases=exclude, k=4)
            assert rows.shape == (4, 4) and bool(valid.all())
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                bank.top_k(queries, exclude_cases=exclude, k=4)
                times.append(time.perf_counter() - t)
            med, p90 = statistics.median(times), sorted(times)[int(0.9 * (len(times) - 1))]
            filled = "add" if not how["bulk"] else f"add {how['added']:,} + bulk {how['bulk']:,}"
            ok = "yes" if med <= 5e-3 else "no"
            print(f"| {n:,} | {d} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | "
                  f"{how['per_add_s'] * 1e6:.0f} | {filled} | {ok} |")  # fmt: skip
            del bank
    print()


def real_entry(size: int, variant: str):
    """(entry, seconds to build the model and make it) from one forward at `size` px."""
    torch.manual_seed(0)
    t = time.perf_counter()
    model = build_model(variant, image_size=size).eval()
    mem = attach_memory(model, MemoryConfig(threshold=0.0))
    images = torch.randn(1, 3, size, size)
    boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]) * size
    meta = {"case_id": ["a"], "task": ["t"], "modality": ["ct"]}
    with torch.no_grad():
        out = model(images, Prompts(boxes=boxes), meta=meta)
        entries = mem.entries_from(model.sam, out, meta, 0)
    assert len(entries) == 1
    return entries[0], time.perf_counter() - t


def bench_bytes(variant: str, real_size: int, per_file: int = 8) -> None:
    print("## 2. bytes per entry\n")
    print(f"`bank.bytes_per_entry()` (in memory) and the file size of a saved {per_file}-entry "
          "bank / entries (safetensors + JSON header). Features: (mem_dim, S/16, S/16) bf16.\n")  # fmt: skip
    print("| px | source | key dim | features | bytes per entry | on disk per entry | "
          "goal <= 0.6 MB at 1024 |")  # fmt: skip
    print("| ---: | --- | ---: | --- | ---: | ---: | --- |")
    real = None
    if real_size:
        entry, secs = real_entry(real_size, variant)
        real = (real_size, entry, f"{variant} forward ({secs:.0f} s)")
    key_dim = real[1].key.numel() if real else MemoryConfig().key_dim or 256
    rows = [(s, None, "shape") for s in (256, 512, 1024) if not real or s != real_size]
    rows = sorted(rows + ([real] if real else []), key=lambda r: r[0])
    gen = torch.Generator().manual_seed(2)
    for size, entry, source in rows:
        if entry is None:  # an entry of the shape the model gives at this size
            entry = random_entry(gen, key_dim, (64, size // 16, size // 16), "a", 0)
        bank = ConfidenceMemory(MemoryConfig(threshold=0.0), {**MODEL_ID, "image_size": size})
        for i in range(per_file):
            bank.add(Entry(entry.key, entry.features, 0.9, "ct", "t", f"case{i}", i))
        with tempfile.TemporaryDirectory() as tmp:
            disk = bank.save(Path(tmp) / "memory.safetensors").stat().st_size / per_file
        per = bank.bytes_per_entry()
        ok = ("yes" if disk <= 0.6e6 else "no") if size == 1024 else ""
        print(f"| {size} | {source} | {entry.key.numel()} | {tuple(entry.features.shape)} | "
              f"{per:,} ({per / 1e6:.3f} MB) | {disk:,.0f} ({disk / 1e6:.3f} MB) | {ok} |")  # fmt: skip
    print()


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (
        p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1
    )
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)


def bench_step(variant: str, size: int, batch: int, repeats: int, fill_entries: int, ks):
    """Median seconds per training step: plain sam2, ours without memory, ours with memory at
    each k in `ks` (the same model and bank); plus the parts of the memory step on their own."""
    from tests._reference import direct_sam2

    torch.manual_seed(0)
    model = build_model(variant, image_size=size).train()
    sam = model.sam
    cfg = MemoryConfig(threshold=0.0, top_k=max(ks), capacity=fill_entries, partition_by="none")
    mem = attach_memory(model, cfg)
    images = torch.randn(batch, 3, size, size)
    boxes = torch.tensor([[0.2, 0.2, 0.7, 0.8]]).repeat(batch, 1) * size
    target = (torch.rand(batch, 1, size // 4, size // 4) > 0.5).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t0 = time.perf_counter()
    mem.writing = True
    with torch.no_grad():  # pre-fill the bank with entries of this model
        for i in range(-(-fill_entries // batch)):
            meta = {"case_id": [f"fill{i}-{j}" for j in range(batch)], "task": ["t"] * batch,
                    "modality": ["ct"] * batch}  # fmt: skip
            out = model(torch.randn(batch, 3, size, size), Prompts(boxes=boxes), meta=meta)
            mem.commit([mem.entries_from(sam, out, meta, 0)])
    fill_s = time.perf_counter() - t0
    bank = mem.bank
    meta = {"case_id": [f"q{j}" for j in range(batch)], "task": ["t"] * batch,
            "modality": ["ct"] * batch}  # fmt: skip
    step_no = [0]

    def step(forward):
        def go():
            loss = dice_bce(forward().float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return go

    def with_memory(k):
        def go():  # as the training loop: candidates after backward, commit after the step
            bank.cfg.top_k = k
            out = model(images, Prompts(boxes=boxes), meta=meta)
            loss = dice_bce(out.low_res_logits.float(), target)
            loss.backward()
            entries = mem.entries_from(sam, out, meta, step_no[0])
            opt.step()
            opt.zero_grad(set_to_none=True)
            mem.commit([entries])
            step_no[0] += 1

        return go

    def without(fn):  # the same model, memory detached for the call
        def go():
            model.memory = None
            try:
                fn()
            finally:
                model.memory = mem

        return go

    fns = {
        "sam2": step(lambda: direct_sam2(sam, images, boxes)[0]),
        "ours": without(step(lambda: model(images, Prompts(boxes=boxes)).low_res_logits)),
        **{f"k={k}": with_memory(k) for k in ks},
    }
    res = alternate(fns, repeats)
    # the parts on their own, at the largest k
    bank.cfg.top_k = max(ks)
    with torch.no_grad():
        feats = model.encode(images, 1, meta)
        _, valid = bank.top_k(mem.keys(sam, feats), [f"q{j}" for j in range(batch)])
        out = model(images, Prompts(boxes=boxes), meta=meta)
    entries = mem.entries_from(sam, out, meta, 0)
    parts = alternate({
        "read + memory attention (forward)": lambda: mem.condition(sam, feats, meta),
        "candidates (memory encoder)": lambda: mem.entries_from(sam, out, meta, 0),
        "commit": lambda: mem.commit([entries]),
    }, repeats)  # fmt: skip
    mem.writing = False
    info = {"entries": len(bank), "fill_s": fill_s, "retrieved": int(valid.sum(1).min()),
            "key_dim": bank.keys.shape[1], "features": tuple(bank.features.shape[1:])}  # fmt: skip
    return res, parts, info


def print_step(args, ks, res, parts, info) -> None:
    print("## 3. training-step overhead\n")
    print(f"`{args.variant}` at {args.step_size} px, batch {args.batch}, fp32, every parameter "
          "trainable; step = forward + Dice/BCE + backward + AdamW; with memory also `candidates` + "
          f"`commit`, as the training loop (bank: {info['entries']} entries of this model, key dim "
          f"{info['key_dim']}, features {info['features']}, filled in {info['fill_s']:.1f} s; "
          f"{info['retrieved']} entries retrieved per image at k={max(ks)}); median of "
          f"{args.repeats} repeats run in turn.\n")  # fmt: skip
    print("| step | seconds | vs plain SAM 2 | vs ours without memory | goal <= 1.25x |")
    print("| --- | ---: | ---: | ---: | --- |")
    names = {"sam2": "plain SAM 2 modules", "ours": "SAMed2Model, no memory",
             **{f"k={k}": f"SAMed2Model + memory, k={k}" for k in ks}}  # fmt: skip
    for key, label in names.items():
        ratio = res[key] / res["ours"]
        ok = ("yes" if ratio <= 1.25 else "no") if key.startswith("k=") else ""
        print(f"| {label} | {res[key]:.3f} | {res[key] / res['sam2']:.3f}x | {ratio:.3f}x | {ok} |")
    print(f"\nParts of the memory step on their own (k={max(ks)}, no grad): "
          + "; ".join(f"{name} {sec * 1e3:.0f} ms" for name, sec in parts.items()) + ".\n")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="bank sizes for the top-k table")
    ap.add_argument("--key-dims", default="256,64", help="key dims (256: Meta's GAP key; 64: "
                    "memory.key_dim default)")  # fmt: skip
    ap.add_argument("--calls", type=int, default=50, help="top-k calls per bank size")
    ap.add_argument("--fill-budget", type=float, default=30, help="seconds of `add` per bank")
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--real-size", type=int, default=1024, help="px of the real-entry forward "
                    "(0: shapes only)")  # fmt: skip
    ap.add_argument("--step-size", type=int, default=256, help="px of the training-step table")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fill", type=int, default=64, help="bank entries for the training step")
    ap.add_argument("--ks", default="1,4", help="k values (entries read per image) to time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: topk,bytes,step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}\n")
    t0 = time.perf_counter()
    if "topk" not in skip:
        bench_topk([int(s) for s in args.sizes.split(",")],
                   [int(d) for d in args.key_dims.split(",")], args.calls, args.fill_budget)  # fmt: skip
    if "bytes" not in skip:
        bench_bytes(args.variant, args.real_size)
    if "step" not in skip:
        ks = [int(k) for k in args.ks.split(",")]
        res, parts, info = bench_step(args.variant, args.step_size, args.batch, args.repeats,
                                      args.fill, ks)  # fmt: skip
        print_step(args, ks, res, parts, info)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
