"""Write docs/recipe-reference.md: every recipe key, from the dataclasses themselves.

    python scripts/recipe_reference.py            # rewrite the page
    python scripts/recipe_reference.py --check    # exit 1 when the page is out of date

Each key's type and default come from the dataclass field; its description from the comment on
the field's line (or the lines just above it). The `adapters:` and `sources:` sections list every
registered kind (`samed2_kit.registry`) with its config class.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import typing
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "recipe-reference.md"


def _comments(cls) -> dict[str, str]:
    """field name -> the comment on its line, or the comment lines right above it."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        name = text.split(":", 1)[0].strip()
        if ":" in text and name.isidentifier() and not text.startswith(("def ", "return")):
            inline = text.split("  # ", 1)[1] if "  # " in text else ""
            out[name] = " ".join([*above, inline]).strip()
        above = []
    return out


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None").replace("samed2_kit.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default).replace("'", "")
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "(section)" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def _table(cls, prefix: str) -> list[str]:
    hints, notes = typing.get_type_hints(cls), _comments(cls)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        sub = next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)
        if sub is not None and "kinds" not in f.metadata:
            nested.append((sub, f"{prefix}{f.name}"))
        meaning = notes.get(f.name, "").replace("|", "\\|")
        kind = _type_name(tp).replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {kind} | {_default(f)} | {meaning} |")
    out = rows + [""]
    for sub, key in nested:
        out += [f"### `{key}`", "", _doc(sub), "", *_table(sub, f"{key}.")]
    return out


def _doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses write when there is none
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    from samed2_kit import registry
    from samed2_kit.config import Recipe

    lines = [
        "# Recipe reference",
        "",
        "Every key a recipe (YAML) may set, generated from the dataclasses of `samed2_kit.config`",
        "and of the registered adapter and prompt-source kinds by `python scripts/recipe_reference.py`",
        "(a test fails when this page is out of date). Set a key in the YAML file or on the command",
        "line as `section.key=value`; unknown keys are errors that name the nearest valid key.",
        "",
        "## Top level",
        "",
        *_table(Recipe, ""),
    ]
    for section, kinds in (
        ("adapters", registry.adapter_kinds()),
        ("sources", registry.source_kinds()),
    ):
        lines += [f"## `{section}` kinds", ""]
        for kind in kinds:
            lines += [f"### `{section}.{kind.name}`", "", _doc(kind.config), ""]
            lines += _table(kind.config, f"{section}.{kind.name}.")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run python scripts/recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
