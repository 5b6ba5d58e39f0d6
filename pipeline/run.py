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

from pipeline.build import build, read_source
from pipeline.config import ConfigError, RunConfig
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


def prepare_output(config: RunConfig) -> None:
  os.makedirs(config.output_dir, exist_ok=True)
  for path in (config.aggregates_path, config.dead_letter_path, config.accounting_path,
               config.sqlite_path):
    if path and os.path.exists(path):
      os.remove(path)


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
  standard.streaming = True  # replays and Kafka are streams, watermarks and all
  if not standard.runner:
    standard.runner = 'DirectRunner'

  prepare_output(config)
  started = time.monotonic()
  with beam.Pipeline(options=options) as p:
    build(p, config, source)
  seconds = time.monotonic() - started
  try:
    accounting = reconcile(config)
  except Reconciliation as e:
    print(f'tidemark: error: outputs do not reconcile: {e}', file=sys.stderr)
    return 3
  print_accounting(accounting, seconds)
  print(f'outputs in {os.path.abspath(config.output_dir)}')
  return 0
