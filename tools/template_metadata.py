"""Writes templates/metadata.json (the Flex Template's parameters) from the
option definitions in pipeline/settings/options.py, and the rules of
pipeline/deployment/customer.schema.json that Python defines (the customer id,
the limits of pipeline/settings/checks.py: customer.SCHEMA_RULES) into it:

  python -m tools.template_metadata [METADATA_PATH [SCHEMA_PATH]]

tests/test_deploy.py fails while metadata.json differs from what this writes,
tests/test_limits.py while the schema's rules differ.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pipeline.deployment.customer import SCHEMA_PATH, schema
from pipeline.settings.options import template_metadata

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'templates', 'metadata.json')
#: The schema's longest line that holds a whole object.
_WIDTH = 100


def render() -> str:
  return json.dumps(template_metadata(), indent=2, ensure_ascii=False) + '\n'


def _compact(node: Any, indent: int = 0, lead: int = 0) -> str:
  """JSON indented by two, an object or a list on one line where it fits in
  _WIDTH columns (``lead``: the width of the key before it), a list of plain
  values always."""
  flat = json.dumps(node, ensure_ascii=False)
  if not isinstance(node, (dict, list)) or indent + lead + len(flat) <= _WIDTH:
    return flat
  if isinstance(node, list) and not any(isinstance(v, (dict, list)) for v in node):
    return flat
  inner = ' ' * (indent + 2)
  if isinstance(node, dict):
    items = []
    for k, v in node.items():
      key = json.dumps(k, ensure_ascii=False) + ': '
      items.append(inner + key + _compact(v, indent + 2, len(key)))
    return '{\n' + ',\n'.join(items) + '\n' + ' ' * indent + '}'
  items = [inner + _compact(v, indent + 2) for v in node]
  return '[\n' + ',\n'.join(items) + '\n' + ' ' * indent + ']'


def render_schema() -> str:
  """customer.schema.json with the rules Python defines filled in."""
  return _compact(schema()) + '\n'


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  path = argv[0] if argv else PATH
  schema_path = argv[1] if len(argv) > 1 else SCHEMA_PATH
  text = render_schema()  # read before either file is written
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render())
  print(f'{path}: {len(template_metadata()["parameters"])} parameters')
  with open(schema_path, 'w', encoding='utf-8') as f:
    f.write(text)
  print(f'{schema_path}: the customer id and the limits of pipeline/settings/checks.py')
  return 0


if __name__ == '__main__':
  sys.exit(main())
