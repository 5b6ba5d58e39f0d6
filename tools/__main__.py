"""The development tools: ``python -m tools COMMAND [args]``, from a checkout.

Commands:
  generate  write an incident-like replay file
            python -m tools generate --out PATH [--messages N] [--seed S]
  simulate  publish incident-like traffic to Pub/Sub or Kafka, or write a replay
            python -m tools simulate --to pubsub|kafka|replay [--rate R]
                [--messages N] [--shift-to-now] [--out PATH] ...
  bench     benchmarks printing one JSON line per run
            python -m tools bench replay --messages N [Beam options for the run]
            python -m tools bench soak --hours 24 --rate 1 --tick 60 [Beam options]
            python -m tools bench stream [--rates 250,500,...] [--step-seconds S] [Beam options]
            python -m tools bench drain | deployed ...

The product's own commands (run, report, deploy) are ``python -m pipeline``.
"""

from __future__ import annotations

import sys
from typing import List, Optional

#: command -> module with ``main(argv) -> int``
COMMANDS = {
    'generate': 'tools.traffic',
    'simulate': 'tools.simulate',
    'bench': 'tools.bench',
}


def main(argv: Optional[List[str]] = None) -> int:
  from pipeline.__main__ import dispatch, quiet_known_warnings
  quiet_known_warnings()
  return dispatch(list(sys.argv[1:] if argv is None else argv), COMMANDS, __doc__ or '')


if __name__ == '__main__':
  sys.exit(main())
