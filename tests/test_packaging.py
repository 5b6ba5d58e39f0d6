"""The constraints file pins what Tidemark is tested with, and is current.

``templates/constraints.txt`` is what the development venv and the workers'
image install with; if a requirement in setup.py changes without the file
being regenerated (``scripts/install.sh --update-constraints``), or the venv
drifts from it, these fail and name the package.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$')


def _pins() -> dict:
  pins = {}
  with open(os.path.join(REPO, 'templates', 'constraints.txt'), encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith('#'):
        continue
      match = PIN.match(line)
      assert match, f'constraints.txt line {number}: not NAME==VERSION: {line!r}'
      name = canonicalize_name(match.group(1))
      assert name not in pins, f'constraints.txt line {number}: {name} pinned twice'
      pins[name] = match.group(2)
  return pins


def test_every_requirement_of_setup_py_is_pinned_within_its_range():
  pins = _pins()
  requirements = [Requirement(r) for r in importlib.metadata.requires('tidemark') or ()]
  wanted = [r for r in requirements
            if r.marker is None or r.marker.evaluate({'extra': 'test'})]
  assert {canonicalize_name(r.name) for r in wanted} >= {'apache-beam', 'ruff', 'pytest'}
  for requirement in wanted:
    name = canonicalize_name(requirement.name)
    assert name in pins, f'{requirement} is not pinned in templates/constraints.txt'
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f'{name}=={pins[name]} is outside setup.py\'s {requirement}')


def test_the_installed_packages_are_the_pinned_versions():
  drift = []
  for name, version in _pins().items():
    try:
      installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      drift.append(f'{name}=={version} is pinned but not installed')
      continue
    if installed != version:
      drift.append(f'{name}: installed {installed}, pinned {version}')
  assert not drift, '\n'.join(drift)
