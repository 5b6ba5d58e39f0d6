"""The Tidemark CLI.

  python -m pipeline run [--source replay:PATH] [--window-size W]
                         [--allowed-lateness L] [--output-dir DIR] [beam options]
  python -m pipeline generate --out PATH [--messages N] [--seed S] ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional


def _generate(argv: List[str]) -> int:
  from pipeline import traffic
  parser = argparse.ArgumentParser(
      prog='python -m pipeline generate',
      description='Write an incident-like replay (contract section 2).')
  parser.add_argument('--out', required=True, help='replay file to write')
  traffic.add_arguments(parser)
  args = parser.parse_args(argv)
  profile = traffic.profile_from_args(args)
  count = traffic.write_replay(args.out, profile)
  print(f'wrote {count:,} messages to {args.out}')
  return 0


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  commands = ('run', 'generate')
  if not argv or argv[0] in ('-h', '--help') or argv[0] not in commands:
    print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ('-h', '--help') else sys.stdout)
    if argv and argv[0] not in ('-h', '--help'):
      print(f'\nunknown command {argv[0]!r}; commands: {", ".join(commands)}', file=sys.stderr)
      return 2
    return 0
  command, rest = argv[0], argv[1:]
  if command == 'generate':
    return _generate(rest)
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  from pipeline.run import run
  return run(rest)


if __name__ == '__main__':
  sys.exit(main())
