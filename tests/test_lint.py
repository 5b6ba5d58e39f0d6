"""The code passes its lint rules (ruff.toml: pyflakes, syntax, statement style,
bugbear) and the type check of the shipped packages (mypy)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
  result = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--no-cache', '.'],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_packages_type_check():
  result = subprocess.run(
      [sys.executable, '-m', 'mypy', '--ignore-missing-imports', '--follow-imports=silent',
       '--cache-dir', os.path.join(REPO, '.stage', 'mypy-cache'), 'pipeline', 'transforms'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
