"""Launching a run: options → config → build → run → reconcile → report."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline.build import ROLLUP_PREFIX, build, build_bulk, read_source
from pipeline.config import BULK_REPLAY_RUNNERS, DIRECT_RUNNERS, ConfigError, RunConfig, watermark_risks
from pipeline.reconciliation import final_panes, reconcile_rollups
from transforms.model import AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.replay import ReplayError
from transforms.sources import kafka_partitions_without_records


class Reconciliation(Exception):
  """The run's outputs do not add up; nothing may go unaccounted."""


def reconcile(config: RunConfig) -> Dict[str, int]:
  """Checks the accounting identity and that ``aggregated`` equals the sum of
  the final panes' counts; returns the accounting."""
  if config.unbounded and not os.path.exists(config.accounting_path):
    return dict.fromkeys(CATEGORIES, 0)  # stopped before any message arrived
  with open(config.accounting_path, encoding='utf-8') as f:
    accounting = json.load(f)
  parts = accounting[INVALID] + accounting[TOO_LATE] + accounting[DUPLICATE] + accounting[
      AGGREGATED]
  problems: List[str] = []
  if accounting[RECEIVED] != parts:
    problems.append(
        f'received {accounting[RECEIVED]} != invalid + too_late + duplicate + '
        f'aggregated = {parts}')
  in_panes = sum(p['count'] for p in final_panes(config.aggregates_path).values())
  if in_panes != accounting[AGGREGATED]:
    problems.append(
        f'aggregated {accounting[AGGREGATED]} != sum of final pane counts {in_panes}')
  if problems:
    raise Reconciliation('; '.join(problems))
  return accounting


#: each rollup's settings and accounting
RollupAccounting = List[Tuple[RunConfig, Dict[str, int]]]


def reconcile_run(config: RunConfig) -> Tuple[Dict[str, int], RollupAccounting]:
  """``reconcile`` for the run and for each rollup; with rollups, also writes
  reconciliation.json and checks that every rollup window is explained by the
  primary windows inside it. Returns the accountings (the run's, and each
  rollup's with its config)."""
  problems: List[str] = []
  report = None
  if config.rollups:
    report = reconcile_rollups(config)
    write_json(config.reconciliation_path, report)
  accounting: Dict[str, int] = {}
  rollups: RollupAccounting = []
  for size_config in (config,) + config.rollup_configs:
    try:
      checked = reconcile(size_config)
    except Reconciliation as e:
      problems.append(str(e) if size_config is config else
                      f'rollup {size_config.window_size_s} s: {e}')
      continue
    if size_config is config:
      accounting = checked
    else:
      rollups.append((size_config, checked))
  for rollup in report['rollups'] if report else ():
    if not rollup['reconciled']:
      problems.append(
          f'rollup {rollup["window_size_s"]} s: {rollup["windows_unexplained"]} windows are '
          'not the primary windows inside them plus the events only one accepted' +
          ''.join(f'; {p}' for p in rollup['problems'][:3]) +
          f' (see {config.reconciliation_path})')
  if problems:
    raise Reconciliation('; '.join(problems))
  return accounting, rollups


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


def write_json(path: str, record) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
    f.write('\n')


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


def print_metrics(result, groups_in_java: bool, out=sys.stdout) -> None:
  """Beam's own metrics, beside the exact accounting. (User counters are
  best-effort on the streaming DirectRunner, which undercounts them.) With
  ``groups_in_java``, also what the runner's GroupByKeys dropped as expired."""
  try:
    metrics = result.metrics().query()
  except Exception:  # pylint: disable=broad-except
    return  # some runners do not report metrics
  counters = {}
  for counter in metrics['counters']:
    if (counter.key.step or '').startswith(ROLLUP_PREFIX):
      continue  # the table above is the primary window size's
    if counter.key.metric.namespace == 'tidemark':
      name = counter.key.metric.name
      counters[name] = counters.get(name, 0) + (counter.committed or counter.attempted or 0)
  if counters:
    shown = ', '.join(f'{c}={counters[c]:,}' for c in CATEGORIES if c in counters)
    print(f'beam counters (best effort; the streaming DirectRunner loses most user-counter '
          f'updates, the table above is exact): {shown}', file=out)
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


def prepare_output(config: RunConfig) -> None:
  """Empties the run's output files (and each rollup's) of any earlier run."""
  for size_config in (config,) + config.rollup_configs:
    os.makedirs(size_config.output_dir, exist_ok=True)
    for path in (size_config.aggregates_path, size_config.dead_letter_path,
                 size_config.accounting_path, size_config.sqlite_path,
                 size_config.memory_path, size_config.refused_path,
                 size_config.duplicates_path, size_config.reconciliation_path):
      if path and os.path.exists(path):
        os.remove(path)
    # Before anything arrives, every count is zero; the pipeline replaces this
    # record as messages are accounted for (an empty stream emits none).
    write_json(size_config.accounting_path, dict.fromkeys(CATEGORIES, 0))


def print_rollups(config: RunConfig, rollups: RollupAccounting, out=sys.stdout) -> None:
  """One line per rollup: its accounting and how it reconciled."""
  report = {}
  if os.path.exists(config.reconciliation_path):
    with open(config.reconciliation_path, encoding='utf-8') as f:
      report = {r['window_size_s']: r for r in json.load(f)['rollups']}
  for rollup, accounting in rollups:
    counts = ', '.join(f'{c} {accounting[c]:,}' for c in CATEGORIES)
    line = (f'rollup {rollup.window_size_s} s (lateness {rollup.allowed_lateness_s} s) in '
            f'{rollup.output_dir}: {counts}')
    r = report.get(rollup.window_size_s)
    if r:
      line += (f'; {r["windows"]:,} windows, {r["windows_with_differences"]:,} differ from '
               f'the {config.window_size_s} s windows inside them by '
               f'{r["events_only_in_rollup"]:,} events only the rollup accepted and '
               f'{r["events_only_in_primary"]:,} only the {config.window_size_s} s windows '
               f'accepted, {r["windows_unexplained"]:,} unexplained')
    print(line, file=out)
  if report:
    print(f'reconciliation: {config.reconciliation_path}', file=out)


def _wait_until_finished(result) -> None:
  """Waits for the job; raises if it failed. A job cancelled from outside (the
  runner's UI or job service, a benchmark) stopped like an interrupted one."""
  try:
    result.wait_until_finish()
  except RuntimeError:
    if result.state != beam.runners.runner.PipelineState.CANCELLED:
      raise
    print('tidemark: the job was cancelled; stopping', file=sys.stderr)


def run_unbounded(options: PipelineOptions, config: RunConfig, source):
  """Runs until ``config.run_seconds`` have passed (then cancels) or until
  interrupted; the outputs hold what the windows emitted by then. Returns the
  PipelineResult."""
  p = beam.Pipeline(options=options)
  build(p, config, source)
  result = p.run()
  deadline = None if config.run_seconds is None else time.monotonic() + config.run_seconds
  try:
    if deadline is None:
      _wait_until_finished(result)
      return result
    while time.monotonic() < deadline:
      state = result.state
      if beam.runners.runner.PipelineState.is_terminal(state):
        _wait_until_finished(result)  # raises if it failed
        return result
      time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
  except KeyboardInterrupt:
    print('tidemark: interrupted; stopping', file=sys.stderr)
  finally:
    if not beam.runners.runner.PipelineState.is_terminal(result.state):
      result.cancel()
  return result


#: A bulk replay this large runs on one DirectRunner worker process per core
#: (below it, starting the processes costs more than they save).
PARALLEL_BULK_MESSAGES = 200_000


def use_every_core(options: PipelineOptions, argv: List[str], messages: int) -> None:
  """A large bulk replay on the DirectRunner: one worker process per core,
  unless ``--direct_num_workers`` was given."""
  if (options.view_as(StandardOptions).runner not in BULK_REPLAY_RUNNERS or
      messages < PARALLEL_BULK_MESSAGES or
      any(a.startswith('--direct_num_workers') for a in argv)):
    return
  direct = options.view_as(DirectOptions)
  direct.direct_num_workers = os.cpu_count() or 1
  direct.direct_running_mode = 'multi_processing'


def main(argv: Optional[List[str]] = None) -> int:
  """``python -m pipeline run``: run, reconcile, print the accounting."""
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  options = PipelineOptions(argv)
  try:
    config = RunConfig.from_options(options)
    source = read_source(config)
  except (ConfigError, ReplayError) as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  standard = options.view_as(StandardOptions)
  # Replays, Pub/Sub and Kafka are streams, watermarks and all; a bulk replay
  # knows its whole timeline in advance and runs as a batch.
  standard.streaming = config.replay_mode != 'bulk'
  flow = build_bulk if config.replay_mode == 'bulk' else build
  if not standard.runner:
    standard.runner = 'DirectRunner'
  if config.replay_mode == 'bulk':
    use_every_core(options, sys.argv[1:] if argv is None else argv, source.index.messages)
  try:
    warnings = watermark_risks(config, standard.runner)
  except ConfigError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  warnings += source_warnings(config)
  for warning in warnings:
    print(f'\n*** tidemark: WARNING: {warning}\n', file=sys.stderr, flush=True)

  prepare_output(config)
  started = time.monotonic()
  if config.unbounded:
    result = run_unbounded(options, config, source)
  else:
    p = beam.Pipeline(options=options)
    flow(p, config, source)
    result = p.run()
    result.wait_until_finish()
  seconds = time.monotonic() - started
  # Beam Java's GroupByKey counts what it drops as expired; the Python runners' do not.
  groups_in_java = standard.runner not in DIRECT_RUNNERS
  rollups: RollupAccounting = []
  try:
    accounting, rollups = reconcile_run(config)
    dropped = runner_late_drops(result) if groups_in_java else None
    if dropped:
      raise Reconciliation(
          f'the runner dropped {dropped:,} admitted events as expired '
          f'({RUNNER_LATE_DROPS[0]}.{RUNNER_LATE_DROPS[1]})')
  except Reconciliation as e:
    if result.state == beam.runners.runner.PipelineState.DONE:
      print(f'tidemark: error: outputs do not reconcile: {e}', file=sys.stderr)
      return 3
    # A stream stopped mid-way: the accounting is its last snapshot (rewritten
    # every few seconds) and windows still open have no final pane yet.
    with open(config.accounting_path, encoding='utf-8') as f:
      accounting = json.load(f)
    print(f'tidemark: note: stopped mid-stream, so messages in flight and windows '
          f'not yet closed are not final: {e}', file=sys.stderr)
  print_accounting(accounting, seconds)
  print_rollups(config, rollups)
  print_metrics(result, groups_in_java)
  print(f'outputs in {os.path.abspath(config.output_dir)}')
  return 0
