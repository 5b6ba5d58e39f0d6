"""Where a bulk replay's time goes: ``python -m tools bench replay --profile``.

The run is repeated in one process (the DirectRunner in memory, one worker)
under cProfile, and its time is split into the flow's phases by the cumulative
time of each phase's own entry points. cProfile slows Python code more than C
code, and one process has no data plane between workers, so the shares are a
map of the work, not a forecast of the multi-process run's wall time.
"""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
from typing import Dict, List, Tuple

#: The phases of a bulk run, in flow order: ``(phase, ((file suffix, function[,
#: its class]), ...))`` whose cumulative times add up to the phase. What the
#: pipeline's run takes beyond its DoFns is the runner's (coders, grouping,
#: bundles): ``shuffle``.
PHASES: Tuple[Tuple[str, Tuple[Tuple[str, ...], ...]], ...] = (
    ('index', (('transforms/rules/replay_index.py', 'index_replay'),)),
    ('read_lines', (('transforms/rules/replay_index.py', 'read_chunk_columns'),)),
    ('decode_and_check', (('transforms/flow/bulk.py', 'process', '_ParseChunkFn'),)),
    ('rules', (('transforms/flow/bulk.py', 'process', '_TooLateOrShardFn'),
               ('transforms/flow/bulk.py', 'process', '_AdmitShardFn'))),
    ('pane_firing', (('transforms/flow/bulk.py', 'process', '_AggregateWindowFn'),)),
    ('writing', (('transforms/connectors/writers.py', 'process'),
                 ('transforms/connectors/writers.py', 'finish_bundle'),
                 ('transforms/connectors/sinks.py', 'process'),
                 ('transforms/connectors/sinks.py', 'finish_bundle'))),
)
_RUN = ('apache_beam/pipeline.py', 'run')
_FINISH = ('pipeline/launch/run.py', 'finish')
_REPORT = ('pipeline/readback/report.py', 'write')


def _line_of(path: str, name: str, owner: str) -> int:
  """The line where ``owner.name`` is defined in ``path`` (0: any function of
  that name). Raises LookupError if the class or its method is not there: a
  renamed phase must not be counted as taking no time."""
  if not owner:
    return 0
  with open(path, encoding='utf-8') as f:
    inside = False
    for number, line in enumerate(f, 1):
      if line.startswith(f'class {owner}('):
        inside = True
      elif inside and line.strip().startswith(f'def {name}('):
        return number
  raise LookupError(f'{path}: no method {owner}.{name}: update tools/bench/profile.py PHASES')


def phases(profile_path: str, repo: str) -> Dict[str, float]:
  """Seconds per phase of a cProfile file of ``python -m pipeline run`` on a
  bulk replay, the profile's total, start-up (imports, options, building the
  graph), shuffle, reconciling and the report included."""
  stats = pstats.Stats(profile_path).stats  # type: ignore[attr-defined]

  def cumulative(suffix: str, name: str, owner: str = '') -> float:
    line = _line_of(os.path.join(repo, suffix), name, owner)
    return sum(entry[3] for (path, number, function), entry in stats.items()
               if function == name and path.endswith(suffix) and line in (0, number))

  total = max(entry[3] for entry in stats.values())
  seconds = {phase: sum(cumulative(*where) for where in entries)
             for phase, entries in PHASES}
  idle = [phase for phase, s in seconds.items() if not s]
  if idle:
    raise LookupError(f'no function of {idle} ran in the profiled run: update '
                      'tools/bench/profile.py PHASES')
  run, finish, report = cumulative(*_RUN), cumulative(*_FINISH), cumulative(*_REPORT)
  in_run = sum(v for k, v in seconds.items() if k != 'index')
  seconds['shuffle'] = max(run - in_run, 0.0)
  seconds['reconcile_and_commit'] = max(finish - report, 0.0)
  seconds['report'] = report
  seconds['start_up'] = max(total - seconds['index'] - run - finish, 0.0)
  seconds['total'] = total
  return seconds


def profile_replay(command: List[str], workdir: str, repo: str) -> dict:
  """Runs ``command`` (``python -m pipeline run ...`` arguments after ``-m``)
  under cProfile in one process; returns the seconds and shares per phase."""
  profile_path = os.path.join(workdir, 'run.prof')
  with open(os.path.join(workdir, 'profile.log'), 'w', encoding='utf-8') as log:
    subprocess.run(
        [sys.executable, '-m', 'cProfile', '-o', profile_path, '-m', *command,
         '--direct_num_workers', '1', '--direct_running_mode', 'in_memory'],
        stdout=log, stderr=subprocess.STDOUT, check=True, cwd=repo)
  seconds = phases(profile_path, repo)
  total = seconds.pop('total')
  return {'profiled_s': round(total, 1),
          'share_pct': {k: round(100 * v / total, 1) for k, v in seconds.items()}}
