"""The Tidemark CLI: ``python -m pipeline COMMAND [args]``.

Commands:
  run       run the pipeline (default: the bundled incident replay on the DirectRunner)
            python -m pipeline run [--source replay:PATH | pubsub:[NAME=]projects/P/subscriptions/S,...]
                [--window-size W] [--expected-skew S] [--run-seconds N]
                [--allowed-lateness L] [--rollup SIZE:LATENESS ...] [--output-dir DIR]
                [Beam options...]
            python -m pipeline run --help    (every option; an unknown one stops the run)
  restate   a finished run's closed windows restated from their history, with an audit
            python -m pipeline restate OUTPUT_DIR --from TIME --to TIME
                [--source replay:PATH | kafka:BOOTSTRAP/TOPIC] [--postgres-dsn DSN] [--dry-run]
  deploy    launch one customer's pipeline (templates/customers/NAME.yaml)
            python -m pipeline deploy (--customer NAME | --customer-file PATH)
                --target dataflow|flink [--dry-run]
  report    a run's report page and metrics (written by every run; again on demand)
            python -m pipeline report OUTPUT_DIR [--out PATH] [--serve HOST:PORT]

The development tools (generate, simulate, bench) are ``python -m tools`` in a
checkout; they do not ship with the pipeline.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Dict, List, Optional

#: command -> module with ``main(argv) -> int``
COMMANDS = {
    'run': 'pipeline.launch.run',
    'deploy': 'pipeline.deployment.deploy',
    'report': 'pipeline.readback.report',
    'restate': 'pipeline.launch.restate',
}
#: The development tools' commands: ``python -m tools`` (a checkout's tools/).
TOOL_COMMANDS = ('generate', 'simulate', 'bench')


#: What Beam's local SDK workers log on every start that a user cannot act on:
#: the worker has no pickled __main__ session (Tidemark needs none) and skips
#: the launcher's own options.
QUIET_WORKER_MESSAGES = ('No semi_persistent_directory found', 'Discarding unparseable args')


class _KnownWorkerNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(known in message for known in QUIET_WORKER_MESSAGES)


def quiet_known_warnings() -> None:
  """Silences the warnings of a default run that the user cannot act on, here
  and in the worker processes the run starts (they inherit the environment):
  Google client libraries' notices about future Python and grpc versions, and
  the local workers' start-up notes. Every other warning stays."""
  warnings.filterwarnings('ignore', category=FutureWarning)
  inherited = os.environ.get('PYTHONWARNINGS')
  os.environ['PYTHONWARNINGS'] = ','.join(filter(None, [inherited, 'ignore::FutureWarning']))
  logging.getLogger('apache_beam.runners.portability.local_job_service').addFilter(
      _KnownWorkerNoise())


def main(argv: Optional[List[str]] = None) -> int:
  quiet_known_warnings()
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in TOOL_COMMANDS:
    print(f'tidemark: {argv[0]!r} is a development tool: python -m tools {argv[0]} '
          '(from a Tidemark checkout)', file=sys.stderr)
    return 2
  return dispatch(argv, COMMANDS, __doc__ or '')


def dispatch(argv: List[str], commands: Dict[str, str], usage: str) -> int:
  """Runs ``argv[0]``'s module's ``main(argv[1:])``; the usage for no command
  or ``--help`` (exit 0), and for an unknown one (exit 2)."""
  if not argv or argv[0] in ('-h', '--help'):
    print(usage.strip())
    return 0
  command, rest = argv[0], argv[1:]
  if command not in commands:
    print(usage.strip(), file=sys.stderr)
    print(f'\nunknown command {command!r}; commands: {", ".join(commands)}', file=sys.stderr)
    return 2
  return importlib.import_module(commands[command]).main(rest)


if __name__ == '__main__':
  sys.exit(main())
