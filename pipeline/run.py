"""Launching a run: options → config → build → run → reconcile → report."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from pipeline.build import build, build_bulk, read_source
from pipeline.config import ConfigError, RunConfig, watermark_risks
from transforms.model import AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.replay import ReplayError


class Reconciliation(Exception):
  """The run's outputs do not add up; nothing may go unaccounted."""


def final_panes(aggregates_path: str) -> Dict[tuple, dict]:
  """The pane with the highest index per (customer_id, key, window)."""
  finals: Dict[tuple, dict] = {}
  if not os.path.exists(aggregates_path):
    return finals
  with open(aggregates_path, encoding='utf-8') as f:
    for line in f:
      pane = json.loads(line)
      window = (pane['customer_id'], pane['key'], pane['window_start'], pane['window_end'])
      if window not in finals or pane['pane_index'] > finals[window]['pane_index']:
        finals[window] = pane
  return finals


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


def print_metrics(result, out=sys.stdout) -> None:
  """Beam's own metrics, beside the exact accounting. (User counters are
  best-effort on the streaming DirectRunner, which undercounts them.)"""
  try:
    metrics = result.metrics().query()
  except Exception:  # pylint: disable=broad-except
    return  # some runners do not report metrics
  counters = {}
  for counter in metrics['counters']:
    if counter.key.metric.namespace == 'tidemark':
      name = counter.key.metric.name
      counters[name] = counters.get(name, 0) + (counter.committed or counter.attempted or 0)
  if counters:
    shown = ', '.join(f'{c}={counters[c]:,}' for c in CATEGORIES if c in counters)
    print(f'beam counters (best effort; the streaming DirectRunner loses most user-counter '
          f'updates, the table above is exact): {shown}', file=out)
  for dist in metrics['distributions']:
    name = dist.key.metric.name
    if dist.key.metric.namespace == 'tidemark' and name.startswith('watermark_lag_ms/'):
      value = dist.committed or dist.attempted
      if value and value.count:
        print(f'watermark lag of source {name.split("/", 1)[1]}: mean '
              f'{value.mean / 1000:,.1f} s, max {value.max / 1000:,.1f} s '
              '(behind the most advanced source)', file=out)


def prepare_output(config: RunConfig) -> None:
  os.makedirs(config.output_dir, exist_ok=True)
  for path in (config.aggregates_path, config.dead_letter_path, config.accounting_path,
               config.sqlite_path, config.memory_path, config.refused_path):
    if path and os.path.exists(path):
      os.remove(path)
  # Before anything arrives, every count is zero; the pipeline replaces this
  # record as messages are accounted for (an empty stream emits none).
  with open(config.accounting_path, 'w', encoding='utf-8') as f:
    json.dump(dict.fromkeys(CATEGORIES, 0), f, indent=2)
    f.write('\n')


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
      result.wait_until_finish()
      return result
    while time.monotonic() < deadline:
      state = result.state
      if beam.runners.runner.PipelineState.is_terminal(state):
        result.wait_until_finish()  # raises if it failed
        return result
      time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
  except KeyboardInterrupt:
    print('tidemark: interrupted; stopping', file=sys.stderr)
  finally:
    if not beam.runners.runner.PipelineState.is_terminal(result.state):
      result.cancel()
  return result


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
  try:
    warnings = watermark_risks(config, standard.runner)
  except ConfigError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
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
  try:
    accounting = reconcile(config)
  except Reconciliation as e:
    if not config.unbounded:
      print(f'tidemark: error: outputs do not reconcile: {e}', file=sys.stderr)
      return 3
    # A stream stopped mid-way: the accounting is its last snapshot (rewritten
    # every few seconds) and windows still open have no final pane yet.
    with open(config.accounting_path, encoding='utf-8') as f:
      accounting = json.load(f)
    print(f'tidemark: note: stopped mid-stream, so messages in flight and windows '
          f'not yet closed are not final: {e}', file=sys.stderr)
  print_accounting(accounting, seconds)
  print_metrics(result)
  print(f'outputs in {os.path.abspath(config.output_dir)}')
  return 0
