"""`samed2 medbank build|info|verify`."""

from __future__ import annotations

import sys


def _positive_int(text: str) -> int:
    """argparse type of --num-proc: a whole number >= 1."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of processes >= 1")
    return n


def cmd_build(args) -> int:
    from samed2_kit.medbank.build import build
    from samed2_kit.medbank.spec import load_spec
    from samed2_kit.medbank.store import info_table

    spec, sha = load_spec(args.spec)
    report = build(spec, args.out, sha, num_proc=args.num_proc)
    for path, why in report.skipped:
        print(f"[medbank] skipped {path}: {why}", file=sys.stderr)
    print(
        f"[medbank] wrote {args.out}: {report.images} images, {report.samples} samples, "
        f"{len(report.skipped)} skipped, {report.seconds:.1f} s ({report.slices_per_s:.1f} slices/s)"
    )
    print(info_table(args.out))
    return 0


def cmd_info(args) -> int:
    from samed2_kit.medbank.store import info_table

    print(info_table(args.store))
    return 0


def cmd_verify(args) -> int:
    from samed2_kit.medbank.store import verify

    res = verify(args.store)
    for p in res.problems:
        print(f"[medbank] problem: {p}", file=sys.stderr)
    checked = ", ".join(f"{v} {k}" for k, v in res.checked.items())
    print(f"[medbank] verify {args.store}: {'OK' if res.ok else 'FAILED'} ({checked})")
    return 0 if res.ok else 1


def add_parser(sub) -> None:
    m = sub.add_parser("medbank", help="curate image collections into a store (build/info/verify)")
    verbs = m.add_subparsers(dest="verb", required=True)
    b = verbs.add_parser("build", help="build a store from a YAML spec")
    b.add_argument("spec")
    b.add_argument(
        "--out", required=True, help="store folder: new, empty or a store (replaced on success)"
    )
    b.add_argument(
        "--num-proc",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes reading and encoding cases (the store is the same for every N)",
    )
    b.set_defaults(func=cmd_build)
    i = verbs.add_parser("info", help="counts by modality / task / split")
    i.add_argument("store")
    i.set_defaults(func=cmd_info)
    v = verbs.add_parser("verify", help="masks match images, no split leakage, content hashes")
    v.add_argument("store")
    v.set_defaults(func=cmd_verify)
