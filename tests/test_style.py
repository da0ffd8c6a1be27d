"""The whole tree passes `ruff check` with the repo's ruff.toml (100 columns, ruff's default rules
plus E501). ruff is a test requirement, pinned in requirements-test.txt: its default rules change
between releases."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_check_is_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    if "No module named ruff" in r.stderr:
        raise AssertionError("ruff is not installed: pip install -r requirements-test.txt")
    assert r.returncode == 0, f"`ruff check .` found problems:\n{r.stdout}{r.stderr}"
