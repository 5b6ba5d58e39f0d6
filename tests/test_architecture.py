"""The tree is the architecture (docs/architecture.md): imports go one way,
the contract's rules import no Beam, no module imports itself back through
another, and no module takes a private name from another."""

from __future__ import annotations

import ast
import os
from typing import Dict, List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('pipeline', 'transforms', 'tools')


def _modules() -> Dict[str, str]:
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
          found[module.removesuffix('.__init__')] = path
  return found


MODULES = _modules()


def _imports(path: str) -> List[Tuple[str, List[str]]]:
  """Every import of a module, wherever it is (functions and TYPE_CHECKING
  blocks included): ``(module, names)``."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.append((node.module, [a.name for a in node.names]))
    elif isinstance(node, ast.Import):
      found += [(a.name, []) for a in node.names]
  return found


def _graph() -> Dict[str, Set[str]]:
  graph: Dict[str, Set[str]] = {}
  for module, path in MODULES.items():
    deps = set()
    for imported, names in _imports(path):
      if imported in MODULES:
        deps.add(imported)
      deps |= {f'{imported}.{n}' for n in names if f'{imported}.{n}' in MODULES}
    graph[module] = deps - {module}
  return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index: Dict[str, int] = {}
  low: Dict[str, int] = {}
  stack: List[str] = []
  found: List[List[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_module_imports_itself_back_through_another():
  assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
  assert _cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_imports_go_one_way():
  allowed = {
      'transforms.rules': ('transforms.rules',),
      'transforms.flow': ('transforms.flow', 'transforms.rules'),
      'transforms.connectors': ('transforms.connectors', 'transforms.rules'),
      'transforms': ('transforms',),
      'pipeline': ('pipeline', 'transforms'),
      'tools': ('tools', 'pipeline', 'transforms'),
  }
  wrong = []
  for module, deps in _graph().items():
    layer = next(p for p in allowed if module == p or module.startswith(p + '.'))
    wrong += [f'{module} imports {d}' for d in deps
              if not any(d == a or d.startswith(a + '.') for a in allowed[layer])]
  assert wrong == []


def test_the_contracts_rules_are_plain_python():
  beam = [f'{m} imports {imported}' for m, path in MODULES.items()
          if m.startswith('transforms.rules') for imported, _ in _imports(path)
          if imported.split('.')[0] == 'apache_beam']
  assert beam == []


def test_no_module_takes_a_private_name_from_another():
  taken = [f'{m}: from {imported} import {name}' for m, path in MODULES.items()
           for imported, names in _imports(path) if imported in MODULES and imported != m
           for name in names if name.startswith('_') and not name.startswith('__')]
  assert taken == []


def test_every_package_has_its_line_in_the_architecture_page():
  page = open(os.path.join(REPO, 'docs', 'architecture.md'), encoding='utf-8').read()
  packages = sorted(p for p in {m.rsplit('.', 1)[0] for m in MODULES if '.' in m}
                    if p.split('.')[0] != 'tools')
  for package in packages:
    shown = f'\n{package}/' if '.' not in package else f'\n  {package.split(".")[-1]}/'
    assert shown in page, package
  for module, path in MODULES.items():
    if module.split('.')[0] != 'tools' and not path.endswith('__init__.py'):
      assert f'{module.rsplit(".", 1)[-1]}.py' in page, module
