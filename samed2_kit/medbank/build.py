"""`medbank build`: curate sources into one store (see `schema.py` for its layout).

Cases are split by case id per source (seeded) before any pixel is read (sources joined by
`case_from` are split together; a `split_by: slab` source cuts each volume into contiguous slabs,
one per split); each case is read, preprocessed, sliced and PNG-encoded, by `num_proc` worker
processes when asked, and written in case order, so the store is the same for every `num_proc`. A
case that fails is skipped with its reason in the report and the manifest. The store is built in a
temporary folder and renamed into place at the end, so a failed or interrupted build leaves
nothing behind (and the next build removes what a killed one left).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from samed2_kit.medbank.plan import case_jobs, check_out, namespaces, plan_source
from samed2_kit.medbank.schema import FOV, IMAGES_DIR, MANIFEST, SAMPLES_DIR, SCHEMA_VERSION
from samed2_kit.medbank.spec import BuildSpec
from samed2_kit.medbank.workers import CaseResult, case_results, encode_png

__all__ = ["BuildReport", "build", "encode_png", "row_digest"]


@dataclass
class BuildReport:
    out: str
    images: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    slices_per_s: float = 0.0


def _png_bytes(value) -> bytes | None:
    """The PNG bytes of an image cell: raw bytes, a {"bytes", "path"} dict, or None."""
    return value["bytes"] if isinstance(value, dict) else value


def row_digest(row: dict, image_key: str) -> bytes:
    """What a row contributes to its table's content hash: its PNG bytes, its field-of-view PNG
    bytes when it has one (a missing or None `fov` adds nothing, so stores without one hash as
    before the column existed) and its other fields."""
    rest = json.dumps(
        {k: v for k, v in row.items() if k not in (image_key, FOV)}, sort_keys=True, default=str
    )
    out = (
        hashlib.sha256(_png_bytes(row[image_key])).digest() + hashlib.sha256(rest.encode()).digest()
    )
    fov = _png_bytes(row.get(FOV))
    if fov is not None:
        out += hashlib.sha256(b"fov" + fov).digest()
    return out


class _Table:
    """Rows of one table, flushed to Arrow shards every `chunk` rows; hashed as they come."""

    def __init__(self, folder: Path, features, image_key: str, chunk: int = 2000):
        self.folder, self.features, self.key, self.chunk = folder, features, image_key, chunk
        self.rows: list[dict] = []
        self.shards: list[Path] = []
        self.n = 0
        self.sha = hashlib.sha256()

    def add(self, row: dict) -> int:
        self.sha.update(row_digest(row, self.key))
        for key in (self.key, FOV):
            if row.get(key) is not None:
                row[key] = {"bytes": row[key], "path": None}
        self.rows.append(row)
        self.n += 1
        if len(self.rows) >= self.chunk:
            self.flush()
        return self.n - 1

    def flush(self) -> None:
        from datasets import Dataset

        if self.rows:
            path = self.folder / f"shard-{len(self.shards):05d}"
            Dataset.from_list(self.rows, features=self.features).save_to_disk(str(path))
            self.shards.append(path)
            self.rows = []

    def finish(self, dest: Path) -> None:
        """Gather the shards into one `datasets` folder at `dest`: their Arrow files are moved,
        not copied or read back (memory and time stay flat however large the table), and the
        folder's state.json lists them in order, as `save_to_disk` writes a table of several
        files; `load_from_disk` reads it as one table."""
        import os

        from datasets import load_from_disk

        self.flush()
        if not self.shards:
            return
        files = [f for shard in self.shards for f in sorted(shard.glob("*.arrow"))]
        names = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
        dest.mkdir(parents=True)
        for f, name in zip(files, names, strict=True):
            os.replace(f, dest / name)
        os.replace(self.shards[0] / "dataset_info.json", dest / "dataset_info.json")
        state = json.loads((self.shards[0] / "state.json").read_text())
        state["_data_files"] = [{"filename": name} for name in names]
        state["_fingerprint"] = self.sha.hexdigest()[:16]
        (dest / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        if len(load_from_disk(str(dest))) != self.n:  # datasets changed its folder format
            raise RuntimeError(f"{dest}: the gathered table does not read back as {self.n} rows")


def _write(result: CaseResult, images: _Table, samples: _Table) -> None:
    """Append a case's parts, turning their relative row references into store rows."""
    for part in result.parts:
        ib, sb = images.n, samples.n
        for row in part.images:
            images.add(row)
        for row in part.samples:
            row["image_row"] += ib
            row["neighbors"] = [ib + k for k in row["neighbors"]]
            row["neighbor_samples"] = [sb + k if k >= 0 else -1 for k in row["neighbor_samples"]]
            samples.add(row)


def _manifest(
    spec: BuildSpec, spec_sha256: str, sources_info: list[dict], counts: Counter,
    images: _Table, samples: _Table, report: BuildReport,
) -> dict:  # fmt: skip
    """The store's manifest: schema, tool, spec, sources, sample counts, totals, hashes, skips."""
    from samed2_kit import __version__

    return {
        "schema_version": SCHEMA_VERSION, "tool": f"samed2-kit {__version__}",
        "name": spec.name, "spec_sha256": spec_sha256, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": spec.split, "seed": spec.seed, "clip_radius": spec.clip_radius,
        "max_size": spec.max_size, "sources": sources_info,
        "counts": [{"modality": m, "task": t, "split": s, "samples": n} for (m, t, s), n in sorted(counts.items())],
        "totals": {"images": images.n, "samples": samples.n},
        "licences": sorted({s.licence for s in spec.sources}),
        "content_sha256": {IMAGES_DIR: images.sha.hexdigest(), SAMPLES_DIR: samples.sha.hexdigest()},
        "skipped": [{"path": p, "reason": why} for p, why in report.skipped],
    }  # fmt: skip


def build(
    spec: BuildSpec,
    out: str | Path,
    spec_sha256: str = "",
    progress: bool = True,
    num_proc: int = 1,
) -> BuildReport:
    """Build the store at `out` (replacing an existing store only on success).

    Args:
        spec: the validated spec (`spec.load_spec`).
        out: the store folder: new, empty, or an existing store (a file, or a folder of other
            files, is refused before any work).
        spec_sha256: the spec file's hash, recorded in the manifest.
        progress: one progress bar per source.
        num_proc: worker processes reading and encoding cases (spawned, so a script calling this
            with num_proc > 1 needs the usual `if __name__ == "__main__":` guard); the store's
            content is identical for every value.
    """
    import shutil
    from contextlib import closing

    from datasets import disable_progress_bars
    from tqdm.auto import tqdm

    from samed2_kit.medbank.schema import image_features, sample_features
    from samed2_kit.utils.atomic import atomic_path, remove_stale, write_text

    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"--num-proc {num_proc!r}: give a whole number of processes >= 1")
    out = Path(out)
    remove_stale(out)  # what a killed build of this store left
    check_out(out)
    root = namespaces(spec)
    disable_progress_bars()  # ours (per source) is enough
    report = BuildReport(str(out))
    t0 = time.perf_counter()
    counts: Counter = Counter()
    with atomic_path(out, directory=True) as tmp:
        images = _Table(tmp / "_shards_images", image_features(fov=True), "image")
        samples = _Table(tmp / "_shards_samples", sample_features(), "mask")
        plans = [plan_source(src, si, report) for si, src in enumerate(spec.sources)]
        jobs = case_jobs(plans, spec, root)
        n_slices = 0
        with closing(case_results(jobs, num_proc)) as results:
            for p in plans:
                info, cases = p.info, set()
                for ref in tqdm(p.refs, desc=f"build {p.src.name}", disable=not progress):
                    res = next(results)
                    if res.skipped is not None:
                        report.skipped.append((ref.image, res.skipped))
                        info["skipped"] += 1
                        continue
                    _write(res, images, samples)
                    for part in res.parts:
                        if not res.spacing_known and part.case_id not in info["spacing_unknown"]:
                            info["spacing_unknown"].append(part.case_id)  # metrics in pixels
                        cases.add(part.case_id)
                        info["samples"] += len(part.samples)
                        counts[(p.src.modality, p.src.task, part.split)] += len(part.samples)
                    n_slices += res.n_slices
                    info["images"] += 1
                info["cases"] = len(cases)
        if samples.n == 0:
            raise ValueError(
                "nothing usable remains: every case was skipped:\n"
                + "\n".join(f"  {p}: {why}" for p, why in report.skipped)
            )
        images.finish(tmp / IMAGES_DIR)
        samples.finish(tmp / SAMPLES_DIR)
        report.images, report.samples = images.n, samples.n
        report.seconds = time.perf_counter() - t0
        report.slices_per_s = n_slices / max(report.seconds, 1e-9)
        manifest = _manifest(
            spec, spec_sha256, [p.info for p in plans], counts, images, samples, report
        )
        write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        for shards in ("_shards_images", "_shards_samples"):
            shutil.rmtree(tmp / shards, ignore_errors=True)
    return report
