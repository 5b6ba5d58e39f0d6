"""What a run reports besides its files: the runner's own count of late drops,
warnings about the source, the accounting table and Beam's metrics."""

from __future__ import annotations

import sys
from typing import Dict, List, Optional

from pipeline.settings.config import RunConfig
from transforms.rules.model import CATEGORIES, INVALID, RECEIVED
from transforms.connectors.sources import kafka_partitions_without_records


#: Where Beam Java's GroupByKey (Flink, Dataflow) counts the elements it drops
#: as expired. The gate admits nothing a window could drop, so it must stay 0.
RUNNER_LATE_DROPS = ('org.apache.beam.runners.core.LateDataDroppingDoFnRunner',
                     'droppedDueToLateness')


def runner_late_drops(result) -> Optional[int]:
  """What the runner's GroupByKeys dropped as expired, summed over steps, for
  a runner whose grouping is Beam Java's (Flink, Dataflow; the counter exists
  once something is dropped). None when the job reported no metrics: a
  portable job reports them once it has finished, not when it was cancelled."""
  try:
    metrics = result.metrics().query()
  except Exception:  # pylint: disable=broad-except
    return None  # runners without metrics
  if not any(metrics.values()):
    return None
  namespace, name = RUNNER_LATE_DROPS
  return sum((c.committed if c.committed is not None else c.attempted) or 0
             for c in metrics['counters']
             if (c.key.metric.namespace, c.key.metric.name) == (namespace, name))


def source_warnings(config: RunConfig) -> List[str]:
  """What in the source itself will hold the watermark back (Kafka partitions
  without a record); nothing when it cannot be asked."""
  if config.source_kind != 'kafka':
    return []
  bootstrap, sources = config.kafka
  try:
    empty = kafka_partitions_without_records(bootstrap, sources.values())
  except Exception:  # pylint: disable=broad-except
    return []  # the read itself reports an unreachable broker
  if not empty:
    return []
  return [f'{len(empty)} Kafka partition(s) hold no record yet ({", ".join(empty[:6])}'
          f'{", ..." if len(empty) > 6 else ""}). Until each has its first record it '
          'holds the watermark at the beginning of time: no window closes and no '
          'ON_TIME pane fires. Publish to every partition, or leave empty ones out.']


def print_accounting(accounting: Dict[str, int], seconds: float, out=sys.stdout) -> None:
  received = accounting[RECEIVED] or 1
  try:
    from rich.console import Console
    from rich.table import Table
  except ImportError:  # pragma: no cover - rich is a declared dependency
    for category in CATEGORIES:
      print(f'{category:>10}  {accounting[category]:>10,}', file=out)
    return
  table = Table(title=f'Tidemark accounting ({seconds:.1f} s)')
  table.add_column('outcome')
  table.add_column('messages', justify='right')
  table.add_column('share', justify='right')
  for category in CATEGORIES:
    n = accounting[category]
    table.add_row(category, f'{n:,}', f'{100 * n / received:.2f}%')
  table.add_row('unaccounted', str(accounting[RECEIVED] - sum(
      accounting[c] for c in CATEGORIES[1:])), '', style='bold')
  Console(file=out).print(table)


#: The share of invalid messages above which a run warns that its input is mostly
#: not events (a wrong topic, a changed producer, a broken replay).
INVALID_SHARE_WARNING = 0.5


def accounting_warnings(accounting: Dict[str, int]) -> List[str]:
  """What an operator must hear about a run's accounting, beyond its table."""
  received, invalid = accounting[RECEIVED], accounting[INVALID]
  if received and invalid / received > INVALID_SHARE_WARNING:
    return [f'{invalid:,} of {received:,} messages ({100 * invalid / received:.1f} %) were '
            'invalid: the input is mostly not events; dead_letter.jsonl gives each one\'s '
            'reason']
  return []


def print_metrics(result, groups_in_java: bool, out=sys.stdout) -> None:
  """Beam's own metrics that the accounting does not say: with
  ``groups_in_java``, what the runner's GroupByKeys dropped as expired, and
  each replay source's watermark lag."""
  try:
    metrics = result.metrics().query()
  except Exception:  # pylint: disable=broad-except
    return  # some runners do not report metrics
  # Beam's user counters of the outcomes are not printed: the streaming
  # DirectRunner loses most of their updates and portable Flink reports part
  # of them, so beside the exact table they could only mislead.
  dropped = runner_late_drops(result) if groups_in_java else None
  if dropped is not None:
    print(f'dropped by the runner as expired: {dropped:,} '
          f'({RUNNER_LATE_DROPS[0]}.{RUNNER_LATE_DROPS[1]})', file=out)
  elif groups_in_java:
    print('dropped by the runner as expired: not reported (a job that did not finish '
          'reports no metrics)', file=out)
  for dist in metrics['distributions']:
    name = dist.key.metric.name
    if dist.key.metric.namespace == 'tidemark' and name.startswith('watermark_lag_ms/'):
      value = dist.committed or dist.attempted
      if value and value.count:
        print(f'watermark lag of source {name.split("/", 1)[1]}: mean '
              f'{value.mean / 1000:,.1f} s, max {value.max / 1000:,.1f} s '
              '(behind the most advanced source)', file=out)
