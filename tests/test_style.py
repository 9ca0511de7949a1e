"""The code base stays ruff-clean (the linter is part of the test extras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True,
                          text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stdout[-4000:]
