"""`samed2_kit.interactive` imports in a fresh interpreter without the Jupyter widget packages
(the ClickSegmenter itself is tested in tests/unit/test_interactive.py)."""

import subprocess
import sys


def test_importing_needs_no_widget_packages():
    code = (
        "import sys, samed2_kit.interactive; "
        "bad = [m for m in ('ipympl', 'ipywidgets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
