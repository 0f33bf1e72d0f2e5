"""Benchmark: medbank at scale. Builds a synthetic store of ~100k samples and a 10x smaller one
from the same volumes, and reports per store: build time at 1 and 2 processes, peak RSS, size on
disk, `verify` time, loader samples/s with 0, 1 and 2 workers and the start-up time of a training
run on it. Peak RSS must not grow with the store (nothing reads a store whole).

Volumes: `--volumes` uncompressed NIfTI MR-like volumes (int16, `--slices` x `--size`^2, a smooth
background with noise and an ellipse that moves with z, labelled on every slice: one sample per
slice). Each measured command runs in its own process; peak RSS is that process's (`ru_maxrss`)
and, with 2 build processes, the larger of the parent's and a worker's.

    .venv/bin/python bench/bench_scale.py [--volumes 400] [--slices 250] [--size 256]
        [--small 40] [--work DIR] [--skip-2proc]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPEC = """name: scale
split: {{train: 0.8, val: 0.1, test: 0.1}}
sources:
  - name: mr
    layout: volumes
    root: {root}
    image: '{{id}}_img.nii'
    mask: '{{id}}_lab.nii'
    modality: mr
    task: blob
    licence: CC0-1.0
"""

RECIPE = """model: {{variant: test-tiny, image_size: 256}}
data: {{store: {store}, num_workers: 0}}
train: {{steps: 1, batch_size: 4, lr: 0.0005, warmup_steps: 0, val_every: 0, save_every: 0}}
eval: {{split: train, prompt: box, max_items: 2}}
"""


def write_volumes(folder: Path, n: int, z: int, size: int) -> float:
    """Write `n` (image, label) NIfTI pairs; returns seconds."""
    import nibabel as nib

    t = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    base = 300 + 400 * (0.5 * yy + 0.3 * xx)
    aff = np.diag([0.9, 0.9, 1.5, 1.0])
    for v in range(n):
        if (folder / f"v{v:04d}_lab.nii").exists():
            continue
        rng = np.random.default_rng(v)
        img = rng.integers(-12, 13, (z, size, size), dtype=np.int16)  # noise
        lab = np.zeros((z, size, size), np.uint8)
        for k in range(z):
            cy, cx = 0.3 + 0.4 * k / z, 0.5 + 0.2 * np.sin(k / 20 + v)
            blob = ((yy - cy) / 0.12) ** 2 + ((xx - cx) / 0.08) ** 2 < 1
            img[k] += (base + 500 * blob).astype(np.int16)
            lab[k] = blob
        for name, arr in (("img", img), ("lab", lab)):
            nii = nib.Nifti1Image(arr.transpose(2, 1, 0), aff)
            nib.save(nii, str(folder / f"v{v:04d}_{name}.nii"))
    return time.perf_counter() - t


def link_subset(src: Path, dest: Path, n: int) -> None:
    """`dest` holds symlinks to the first `n` volumes of `src`."""
    dest.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        for name in ("img", "lab"):
            f = dest / f"v{v:04d}_{name}.nii"
            if not f.exists():
                f.symlink_to(src / f.name)


def _peak_mb() -> float:
    """Largest RSS (MB) of this process and of the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def child(task: str, args: list[str]) -> None:
    """Run one measured task in this process; print {seconds, rss_mb, ...} as JSON."""
    t = time.perf_counter()
    out: dict = {}
    if task == "build":
        from samed2_kit.medbank.build import build
        from samed2_kit.medbank.spec import load_spec

        spec, sha = load_spec(args[0])
        report = build(spec, args[1], sha, progress=False, num_proc=int(args[2]))
        out = {"samples": report.samples, "images": report.images}
    elif task == "verify":
        from samed2_kit.medbank.store import verify

        res = verify(args[0], progress=False)
        out = {"ok": res.ok, "problems": res.problems[:3]}
    elif task == "loader":
        import torch
        from bench_loader import loader_rate

        torch.set_num_threads(1)
        rate, first, batches = loader_rate(Path(args[0]), 256, 1, int(args[1]), 100, 30.0)
        out = {"samples_per_s": rate, "first_batch_s": first, "batches": batches}
    elif task == "train":
        from samed2_kit.cli import main as cli

        if cli(["train", args[0], "--out", args[1]]):
            raise SystemExit(f"samed2 train {args[0]} failed")
    elif task == "open":
        from samed2_kit.medbank.dataset import StoreDataset

        out = {"samples": len(StoreDataset(args[0], split="train"))}
    out |= {"seconds": time.perf_counter() - t, "rss_mb": _peak_mb()}
    print("RESULT " + json.dumps(out))


def measure(task: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", task, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{task} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def train_startup(store: Path, work: Path) -> dict:
    """`samed2 train` for 1 step (model build, store open, one step, eval of 2 items) in its own
    process: what grows with the store is the start-up."""
    recipe = work / f"recipe-{store.name}.yaml"
    recipe.write_text(RECIPE.format(store=store))
    out = work / f"run-{store.name}"
    shutil.rmtree(out, ignore_errors=True)
    return measure("train", recipe, out)


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=400)
    ap.add_argument("--slices", type=int, default=250)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--small", type=int, default=40, help="volumes of the small store")
    ap.add_argument("--work", help="working folder (kept; default: a temporary one, removed)")
    ap.add_argument("--skip-2proc", action="store_true", help="no 2-process build")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1:])
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        secs = write_volumes(work / "volumes", args.volumes, args.slices, args.size)
        print(f"volumes: {args.volumes} x {args.slices} x {args.size}^2 in {secs:.0f} s")
        rows = []
        for n in (args.small, args.volumes):
            root = work / f"vol{n}"
            link_subset(work / "volumes", root, n)
            (work / f"spec{n}.yaml").write_text(SPEC.format(root=root))
            store = work / f"store{n}"
            b1 = measure("build", work / f"spec{n}.yaml", store, 1)
            row = {"volumes": n, "samples": b1["samples"], "build1": b1}
            if not args.skip_2proc:
                row["build2"] = measure("build", work / f"spec{n}.yaml", work / f"s2-{n}", 2)
                same = json.loads((store / "manifest.json").read_text())["content_sha256"]
                other = json.loads((work / f"s2-{n}" / "manifest.json").read_text())
                row["identical"] = same == other["content_sha256"]
                shutil.rmtree(work / f"s2-{n}")
            row["size_mb"] = du_mb(store)
            row["verify"] = measure("verify", store)
            row["open"] = measure("open", store)
            row["loader"] = {w: measure("loader", store, w) for w in (0, 1, 2)}
            row["train"] = train_startup(store, work)
            rows.append(row)
            print(json.dumps(row), flush=True)
        print_table(rows)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    cols = [r["samples"] for r in rows]
    print("\n| measure | " + " | ".join(f"{n} samples" for n in cols) + " |")
    print("| --- |" + " --- |" * len(rows))

    def line(name, fn):
        print(f"| {name} | " + " | ".join(fn(r) for r in rows) + " |")

    line("build, 1 process (s; slices/s)", lambda r: _rate(r["build1"], r["samples"]))
    if "build2" in rows[0]:
        line("build, 2 processes (s; slices/s)", lambda r: _rate(r["build2"], r["samples"]))
        line(
            "speed-up at 2 processes",
            lambda r: f"{r['build1']['seconds'] / r['build2']['seconds']:.2f}x",
        )
        line("same content hashes at 1 and 2", lambda r: str(r["identical"]))
        line("peak RSS, build 2 proc (MB)", lambda r: f"{r['build2']['rss_mb']:.0f}")
    line("peak RSS, build 1 proc (MB)", lambda r: f"{r['build1']['rss_mb']:.0f}")
    line("store size on disk (MB)", lambda r: f"{r['size_mb']:.0f}")
    line(
        "verify (s; peak RSS MB)",
        lambda r: f"{r['verify']['seconds']:.1f}; {r['verify']['rss_mb']:.0f}",
    )
    line(
        "open StoreDataset (s; RSS MB)",
        lambda r: f"{r['open']['seconds']:.2f}; {r['open']['rss_mb']:.0f}",
    )
    for w in ("0", "1", "2"):
        line(f"loader samples/s, {w} workers", lambda r, w=w: _loader(r["loader"][int(w)]))
    line("train start-up, 1 step + 2 eval items (s; RSS MB)", lambda r: f"{r['train']['seconds']:.1f}; {r['train']['rss_mb']:.0f}")  # fmt: skip


def _rate(m: dict, n: int) -> str:
    return f"{m['seconds']:.0f}; {n / m['seconds']:.0f}"


def _loader(m: dict) -> str:
    return f"{m['samples_per_s']:.0f} (first batch {m['first_batch_s']:.1f} s)"


if __name__ == "__main__":
    main()
