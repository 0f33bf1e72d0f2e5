"""The recipe schema and the CLI parser import no torch, checked in a fresh interpreter (the import
graph itself is checked in tests/unit/test_imports.py)."""

import subprocess
import sys


def test_recipe_schema_and_cli_parser_import_no_torch():
    code = (
        "import sys\n"
        "import samed2_kit.config, samed2_kit.registry, samed2_kit.utils.dataconf\n"
        "from samed2_kit.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
