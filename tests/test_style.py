"""The tree's style, held by the tests: ruff clean, and no code file of the units grows past ~500 lines
without saying at its top why it is one file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("storage", "transformer", "training", "predictor", "pipelines")
MAX_LINES = 500
LONG_REASON = "Why one file:"  # a paragraph in the module docstring that starts so


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_long_files_say_why_they_are_one_file():
    long = []
    for unit in UNITS:
        for path in sorted((ROOT / unit).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > MAX_LINES and LONG_REASON not in text[:3000]:
                long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not long, f"split these by concern, or say '{LONG_REASON} …' in their docstring: {long}"
