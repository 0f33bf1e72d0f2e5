"""What a build will do, decided before any pixel is read: which cases each source has, which
source's case ids each shares (`case_from`), the split of every case (or the slabs of a
`split_by: slab` volume), and whether `--out` can become the store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from samed2_kit.medbank.pairs import split_counts
from samed2_kit.medbank.schema import MANIFEST
from samed2_kit.medbank.spec import BuildSpec, SourceSpec


def slab_ranges(zs: list[int], n: int, fractions: dict[str, float]) -> list[tuple[str, int, int]]:
    """Cut a volume of `n` slices into contiguous slabs, one per split in the order of `fractions`
    (train, then val, then test): [(split, first slice, end slice (exclusive))].

    The cut is made over `zs`, the sorted slices that hold samples, so each split gets its fraction
    of the labelled slices (at least one each where the fraction > 0 and there are enough); the
    slices before the first and after the last labelled slice go to the first and last slab. A
    split that gets no labelled slice gets no slab."""
    counts = split_counts(len(zs), fractions)
    firsts, at = [], 0
    for k in fractions:
        if counts[k] > 0:
            firsts.append((k, zs[at]))
            at += counts[k]
    return [
        (k, 0 if i == 0 else z0, firsts[i + 1][1] if i + 1 < len(firsts) else n)
        for i, (k, z0) in enumerate(firsts)
    ]


@dataclass
class CaseJob:
    """What a worker needs to turn one source image into rows (picklable)."""

    src: SourceSpec
    ref: object  # layouts.CaseRef
    names: dict[int, str]
    seed: int
    case_id: str  # "<namespace>/<case>"; "@<split>" is appended per slab
    split: str | None  # None: split_by slab, cut with `fractions`
    fractions: dict[str, float]
    clip_radius: int
    max_size: int | None


def namespaces(spec: BuildSpec) -> dict[str, str]:
    """Source name -> the source whose case ids (and split) it shares: itself, or the root of its
    `case_from` chain. ValueError for a combination the build cannot honour."""
    by_name = {s.name: (i, s) for i, s in enumerate(spec.sources)}
    root: dict[str, str] = {}
    for i, s in enumerate(spec.sources):
        if not s.case_from:
            root[s.name] = s.name
            continue
        other = by_name.get(s.case_from)
        if other is None or other[0] >= i:
            raise ValueError(
                f"source {s.name!r} case_from={s.case_from!r}: name a source listed before it "
                f"({[x.name for x in spec.sources[:i]] or 'none'})"
            )
        o = other[1]
        if "slab" in (s.split_by, o.split_by):
            raise ValueError(
                f"source {s.name!r} case_from={s.case_from!r}: split_by slab cuts volumes into "
                "slabs, so its cases cannot be shared: drop case_from or use split_by: case"
            )
        root[s.name] = root[o.name]
        mine, theirs = s.split, by_name[root[s.name]][1].split or spec.split
        if mine is not None and dict(mine) != dict(theirs):
            raise ValueError(
                f"source {s.name!r}: split {mine} differs from {root[s.name]!r}'s {theirs}, with "
                "which it shares cases (case_from): drop this source's split"
            )
    return root


def check_out(out: Path) -> None:
    """ValueError before any work when `out` cannot become the store: an existing file, or a
    folder holding files that is not a store (never replace a user's folder)."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {out} is a file; give a folder (a new one, or a store to replace)")
    if out.is_dir() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ValueError(
            f"--out {out} is a folder with files that is not a medbank store (no {MANIFEST}); "
            "give a new or empty folder, or an existing store to replace"
        )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder; give a folder path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent}; give a folder you can write")


@dataclass
class SourcePlan:
    src: SourceSpec
    si: int
    refs: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def plan_source(src: SourceSpec, si: int, report) -> SourcePlan:
    """Enumerate a source's cases (no pixels read); a source that cannot be enumerated is
    skipped with its reason (skips go to `report.skipped`, a `build.BuildReport`)."""
    from samed2_kit.medbank.layouts import enumerate_cases, label_names

    info = {"name": src.name, "layout": src.layout, "root": src.root, "modality": src.modality,
            "task": src.task, "licence": src.licence, "cases": 0, "images": 0, "samples": 0,
            "skipped": 0, "spacing_unknown": []}  # fmt: skip
    if src.case_from:
        info["case_from"] = src.case_from
    if src.split_by != "case":
        info["split_by"] = src.split_by
    plan = SourcePlan(src, si, info=info)
    try:
        plan.refs, skipped = enumerate_cases(src)
        plan.names = label_names(src)
    except (ValueError, FileNotFoundError, KeyError) as e:
        plan.refs = []
        report.skipped.append((src.root, str(e)))
        info["skipped"] += 1
        return plan
    report.skipped += skipped
    info["skipped"] += len(skipped)
    return plan


def case_jobs(plans: list[SourcePlan], spec: BuildSpec, root: dict[str, str]) -> list[CaseJob]:
    """One job per source image, in source then case order; the split of every case decided here
    (jointly for sources that share case ids)."""
    from samed2_kit.medbank.pairs import split_by_case

    by_name = {p.src.name: p for p in plans}
    fractions = {p.src.name: dict(by_name[root[p.src.name]].src.split or spec.split) for p in plans}
    pooled: dict[str, list] = {}
    for p in plans:
        if p.src.split_by == "case":
            pooled.setdefault(root[p.src.name], []).extend(p.refs)
    split_of = {
        name: {r.case_id: k for k, rs in split_by_case(refs, fractions[name], spec.seed).items() for r in rs}
        for name, refs in pooled.items()
    }  # fmt: skip
    jobs = []
    for p in plans:
        name, ns = p.src.name, root[p.src.name]
        for ci, ref in enumerate(p.refs):
            jobs.append(CaseJob(
                p.src, ref, p.names, seed=spec.seed * 1_000_003 + p.si * 10_007 + ci,
                case_id=f"{ns}/{ref.case_id}",
                split=split_of[ns][ref.case_id] if p.src.split_by == "case" else None,
                fractions=fractions[name], clip_radius=spec.clip_radius, max_size=spec.max_size,
            ))  # fmt: skip
    return jobs
