"""Writes templates/metadata.json (the Flex Template's parameters) from the
option definitions in pipeline/settings/options.py:

  python -m tools.template_metadata [PATH]

tests/test_deploy.py fails while the file differs from what this writes.
"""

from __future__ import annotations

import json
import os
import sys

from pipeline.settings.options import template_metadata

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'templates', 'metadata.json')


def render() -> str:
  return json.dumps(template_metadata(), indent=2, ensure_ascii=False) + '\n'


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  path = argv[0] if argv else PATH
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render())
  print(f'{path}: {len(template_metadata()["parameters"])} parameters')
  return 0


if __name__ == '__main__':
  sys.exit(main())
