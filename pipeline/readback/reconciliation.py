"""Reading a run's outputs back: final panes, and rollups reconciled against
the primary windows inside them.

The rule. Both window sizes see the same messages; each sends every copy of
an event to exactly one of too_late, duplicate or aggregated (its accounting
identity). So, as multisets of event copies, per rollup window::

    aggregated by the rollup - aggregated by the primary
      = (too_late + duplicate of the primary) - (too_late + duplicate of the rollup)

The right side is in the outputs, payloads and all (dead_letter.jsonl and
duplicates.jsonl of each size): after identical copies cancel, what is left is
exactly the events one size aggregated and the other did not, with the other's
reason. A rollup window's final figures must then equal the primary final
panes inside it plus the events only the rollup accepted, minus those only the
primary accepted: count exactly, sum up to the rounding of the sums as
written (each is exactly rounded; the bound is computed, and with integer
values it is zero), min and max exactly where an event only the primary
accepted could not have been the extreme (else within the bounds the figures
allow). A window that does not is unexplained.

A run's folder says whether it holds a finished run: ``run.json`` (see
pipeline/runfolder/files.py for the commit protocol). Only ``complete`` (and, for an
unbounded run, ``stopped``) describes the files beside it; anything else, or
no run.json at all, means they are not a finished run's.
"""

from __future__ import annotations

import collections
import fractions
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Counter, Dict, Iterable, List, NamedTuple, Optional, Tuple

from pipeline.runfolder.files import COMMITTED, MANIFEST, RUNNING, STAGING_PREFIX, read_json
from transforms.connectors.writers import is_local
from transforms.rules.model import (
    AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE, WindowKey, final_panes_of)
from transforms.rules.payload import InvalidPayload, parse_payload

if TYPE_CHECKING:  # the settings' type only: reading outputs back loads no Beam
  from pipeline.settings.config import RunConfig

#: (customer_id, key, window_start, window_end)
Window = WindowKey

RULE = (
    'rollup final = sum of the primary final panes inside the rollup window '
    '+ events only the rollup aggregated - events only the primary aggregated')


def read_manifest(output_dir: str) -> Optional[dict]:
  """OUTPUT_DIR/run.json, or None where there is none."""
  return read_json(os.path.join(output_dir, MANIFEST))


def holds_finished_run(output_dir: str) -> bool:
  """Whether the files in ``output_dir`` are a committed run's (``complete``,
  or an unbounded run ``stopped``)."""
  return (read_manifest(output_dir) or {}).get('status') in COMMITTED


def live_output_dir(output_dir: str) -> str:
  """Where the run now in progress in ``output_dir`` writes (its staging
  folder, for readers that follow an unbounded run as it runs); ``output_dir``
  itself when no run is in progress."""
  running = []
  if os.path.isdir(output_dir):
    for name in os.listdir(output_dir):
      manifest = read_json(os.path.join(output_dir, name, MANIFEST)) or {}
      if name.startswith(STAGING_PREFIX) and manifest.get('status') == RUNNING:
        running.append((manifest.get('started_at') or '', name))
  return os.path.join(output_dir, max(running)[1]) if running else output_dir


def refused_lines(config) -> List[str]:
  """What a customer-scoped database sink refused (the run's and its rollups'
  refused.jsonl), as one line; none if it refused nothing."""
  records = [r for c in (config,) + config.rollup_configs for r in _jsonl(c.refused_path)]
  letters = sum('reason' in r for r in records)
  return [f'{config.sink} sink scoped to customer {config.customer_id!r}: refused '
          f'{len(records) - letters:,} panes and {letters:,} dead letters of other customers '
          '(see refused.jsonl)'] if records else []


def final_panes(aggregates_path: str) -> Dict[Window, dict]:
  """The pane with the highest index per (customer_id, key, window)."""
  if not os.path.exists(aggregates_path):
    return {}
  with open(aggregates_path, encoding='utf-8') as f:
    return final_panes_of(json.loads(line) for line in f)


class Copy(NamedTuple):
  """What an event copy adds to an aggregate (copies equal in this are
  interchangeable)."""
  event_id: str
  customer_id: str
  key: str
  event_time: int
  value: float


class NotAggregated(NamedTuple):
  """The copies one window size did not aggregate, and why."""
  copies: Counter[Copy]
  #: per copy, ``(reason, detail)`` of each of its not-aggregated arrivals
  reasons: Dict[Copy, List[Tuple[str, str]]]
  #: records that should carry an event and do not
  problems: List[str]


def _jsonl(path: str) -> Iterable[dict]:
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      for line in f:
        yield json.loads(line)


def not_aggregated(dead_letter_path: str, duplicates_path: str) -> NotAggregated:
  """The too_late dead letters and the duplicates of one window size, as copies."""
  copies: Counter[Copy] = collections.Counter()
  reasons: Dict[Copy, List[Tuple[str, str]]] = {}
  problems: List[str] = []
  records = [r for r in _jsonl(dead_letter_path) if r['reason'] == TOO_LATE]
  records += [r for r in _jsonl(duplicates_path) if r['reason'] == DUPLICATE]
  for record in records:
    try:
      event_id, customer_id, key, value, event_time = parse_payload(record['data'])
    except InvalidPayload as e:
      problems.append(f'a {record["reason"]} record has an invalid payload ({e}): '
                      f'{record["data"][:200]!r}')
      continue
    copy = Copy(event_id, customer_id, key, event_time, value)
    copies[copy] += 1
    reasons.setdefault(copy, []).append((record['reason'], record['detail']))
  return NotAggregated(copies, reasons, problems)


def _figures(count: int, total: float, low: float, high: float) -> dict:
  return {'count': count, 'sum': total, 'min': low, 'max': high}


def _exact_sum(parts: List[float]) -> float:
  """The exact sum rounded once, clamped to the range of a double (as the
  windows' sums are)."""
  try:
    return math.fsum(parts)
  except OverflowError:
    exact = sum((fractions.Fraction(v) for v in parts), fractions.Fraction(0))
    return math.copysign(sys.float_info.max, exact) if abs(exact) > sys.float_info.max else float(exact)


def _ulp_bound(*values: float) -> float:
  return sum(math.ulp(v) / 2 for v in values)


class _RollupWindow:
  """One rollup window: the primary finals inside it, its own final, and the
  copies only one of the two aggregated."""

  def __init__(self):
    self.primary: List[dict] = []
    self.rollup: Optional[dict] = None
    self.only_rollup: List[Copy] = []
    self.only_primary: List[Copy] = []

  def check(self, primary_size_ms: int) -> Tuple[Optional[dict], List[str]]:
    """The figures the primary and the differences explain, and what does
    not match the rollup's final pane."""
    added, removed = self.only_rollup, self.only_primary
    count = sum(p['count'] for p in self.primary) + len(added) - len(removed)
    problems: List[str] = []
    final = self.rollup
    if count < 0:
      return None, [f'more events only in the primary ({len(removed)}) than the primary '
                    'windows hold']
    if count == 0:
      if final is not None:
        problems.append(f'the rollup has {final["count"]} events, the primary and the '
                        'differences none')
      return None, problems
    parts = [p['sum'] for p in self.primary] + [c.value for c in added] + [
        -c.value for c in removed]
    total = _exact_sum(parts)
    # A clamped sum (beyond the range of a double) only bounds the exact one.
    clamped = any(abs(v) == sys.float_info.max for v in parts + [total])
    # Every copy the rollup holds is in a primary window or only in the rollup.
    values = [c.value for c in added]
    low = min([p['min'] for p in self.primary] + values)
    high = max([p['max'] for p in self.primary] + values)
    # A primary window's extreme surely remains unless an event only the
    # primary accepted there could have been it.
    removed_in: Dict[int, List[float]] = collections.defaultdict(list)
    for c in removed:
      removed_in[c.event_time - c.event_time % primary_size_ms].append(c.value)
    low_sure = min(values + [
        p['min'] for p in self.primary
        if all(v > p['min'] for v in removed_in[p['window_start']])], default=math.inf)
    high_sure = max(values + [
        p['max'] for p in self.primary
        if all(v < p['max'] for v in removed_in[p['window_start']])], default=-math.inf)
    expected = _figures(count, total, low, high)
    # Where the extreme is not sure, the figures only bound it (None: unbounded).
    if low_sure != low:
      expected['min_at_most'] = low_sure if math.isfinite(low_sure) else None
    if high_sure != high:
      expected['max_at_least'] = high_sure if math.isfinite(high_sure) else None
    if final is None:
      return expected, [f'the primary and the differences give {count} events, the rollup '
                        'has no window']
    if final['count'] != count:
      problems.append(f'count: rollup {final["count"]}, explained {count}')
    bound = _ulp_bound(final['sum'], total, *(p['sum'] for p in self.primary))
    if not clamped and abs(final['sum'] - total) > bound:
      problems.append(f'sum: rollup {final["sum"]!r}, explained {total!r}')
    if not low <= final['min'] <= low_sure:
      problems.append(f'min: rollup {final["min"]!r}, explained {low!r}' + (
          f'..{low_sure!r}' if low_sure != low else ''))
    if not high_sure <= final['max'] <= high:
      problems.append(f'max: rollup {final["max"]!r}, explained {high!r}' + (
          f' (at least {high_sure!r})' if high_sure != high else ''))
    return expected, problems


def _difference(copy: Copy, primary: str, rollup: str, detail: str) -> dict:
  return {'event_id': copy.event_id, 'event_time': copy.event_time, 'value': copy.value,
          'primary': primary, 'rollup': rollup, 'detail': detail}


def reconcile_rollup(primary, rollup) -> dict:
  """``primary`` and ``rollup`` are RunConfigs (``RunConfig.rollup``); returns
  the rollup's section of reconciliation.json."""
  size_ms = rollup.window_size_s * 1000
  primary_size_ms = primary.window_size_s * 1000
  windows: Dict[Tuple[str, str, int], _RollupWindow] = collections.defaultdict(_RollupWindow)
  problems: List[str] = []
  for (customer, key, start, end), pane in final_panes(primary.aggregates_path).items():
    if end - start != primary_size_ms:
      problems.append(f'a primary pane of {end - start} ms: {pane}')
    windows[customer, key, start - start % size_ms].primary.append(pane)
  for (customer, key, start, end), pane in final_panes(rollup.aggregates_path).items():
    if end - start != size_ms or start % size_ms:
      problems.append(f'a rollup pane of [{start}, {end}): {pane}')
    windows[customer, key, start].rollup = pane

  primary_out = not_aggregated(primary.dead_letter_path, primary.duplicates_path)
  rollup_out = not_aggregated(rollup.dead_letter_path, rollup.duplicates_path)
  problems += primary_out.problems + rollup_out.problems
  only_rollup = primary_out.copies - rollup_out.copies
  only_primary = rollup_out.copies - primary_out.copies
  for copies, side in ((only_rollup, 'only_rollup'), (only_primary, 'only_primary')):
    for copy, n in copies.items():
      window = windows[copy.customer_id, copy.key, copy.event_time - copy.event_time % size_ms]
      getattr(window, side).extend([copy] * n)

  differences = []
  unexplained = 0
  for (customer, key, start), window in sorted(windows.items()):
    expected, window_problems = window.check(primary_size_ms)
    if not (window.only_rollup or window.only_primary or window_problems):
      continue
    unexplained += bool(window_problems)
    primary_panes = window.primary
    entry = {
        'customer_id': customer, 'key': key, 'window_start': start,
        'window_end': start + size_ms,
        'rollup': None if window.rollup is None else _figures(*(
            window.rollup[f] for f in ('count', 'sum', 'min', 'max'))),
        'primary': None if not primary_panes else {
            'windows': len(primary_panes), **_figures(
                sum(p['count'] for p in primary_panes),
                _exact_sum([p['sum'] for p in primary_panes]),
                min(p['min'] for p in primary_panes), max(p['max'] for p in primary_panes))},
        'explained': expected,
        'only_in_rollup': [
            _difference(c, reason, 'aggregated', detail) for c in sorted(window.only_rollup)
            for reason, detail in primary_out.reasons[c][:1]],
        'only_in_primary': [
            _difference(c, 'aggregated', reason, detail) for c in sorted(window.only_primary)
            for reason, detail in rollup_out.reasons[c][:1]],
        'reconciled': not window_problems,
    }
    if window_problems:
      entry['problems'] = window_problems
    differences.append(entry)

  return {
      'window_size_s': rollup.window_size_s,
      'allowed_lateness_s': rollup.allowed_lateness_s,
      'output_dir': os.path.relpath(rollup.output_dir, primary.output_dir),
      'windows': len(windows),
      'windows_with_differences': sum(
          1 for w in windows.values() if w.only_rollup or w.only_primary),
      'events_only_in_rollup': sum(only_rollup.values()),
      'events_only_in_primary': sum(only_primary.values()),
      'windows_unexplained': unexplained,
      'problems': problems,
      'reconciled': not unexplained and not problems,
      'differences': differences,
  }


def reconcile_rollups(config) -> dict:
  """The content of reconciliation.json for a run's ``config``: every
  rollup against the primary windows."""
  rollups = [reconcile_rollup(config, rollup) for rollup in config.rollup_configs]
  return {
      'rule': RULE,
      'primary': {'window_size_s': config.window_size_s,
                  'allowed_lateness_s': config.allowed_lateness_s},
      'rollups': rollups,
      'reconciled': all(r['reconciled'] for r in rollups),
  }


class Reconciliation(Exception):
  """The run's outputs do not add up; nothing may go unaccounted."""


def dead_letters_by_reason(path: str) -> Dict[str, int]:
  """How many lines of a dead-letter file give each ``reason`` (read as bytes:
  the key is the one unescaped ``"reason":"`` of a line the writers wrote)."""
  counts: Dict[str, int] = collections.Counter()
  key = b'"reason":"'
  with open(path, 'rb') as f:
    for line in f:
      at = line.find(key)
      if at >= 0:
        start = at + len(key)
        counts[line[start:line.index(b'"', start)].decode('ascii', 'replace')] += 1
  return counts


def reconcile(config, with_invalid: bool = True) -> Dict[str, int]:
  """Checks the accounting identity, that ``aggregated`` equals the sum of the
  final panes' counts and, for a bounded run whose dead letters are a local file,
  that the file holds one line per dead letter counted (``too_late``, and
  ``invalid`` ``with_invalid``: a rollup's file holds its too-late ones only);
  returns the accounting."""
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
  path = config.dead_letter_path
  if not config.unbounded and is_local(path) and os.path.exists(path):
    written = dead_letters_by_reason(path)
    for reason in (INVALID, TOO_LATE) if with_invalid else (TOO_LATE,):
      if written[reason] != accounting[reason]:
        problems.append(f'{reason} {accounting[reason]} != {written[reason]} dead letters '
                        f'with reason {reason} in {path}')
  if problems:
    raise Reconciliation('; '.join(problems))
  return accounting


#: each rollup's settings and accounting
RollupAccounting = List[Tuple['RunConfig', Dict[str, int]]]


def reconcile_run(config) -> Tuple[Dict[str, int], RollupAccounting]:
  """``reconcile`` for the run and for each rollup; with rollups, also writes
  reconciliation.json and checks that every rollup window is explained by the
  primary windows inside it. Returns the accountings (the run's, and each
  rollup's with its config)."""
  problems: List[str] = []
  report = None
  if config.rollups:
    report = reconcile_rollups(config)
    with open(config.reconciliation_path, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
      f.write('\n')
  accounting: Dict[str, int] = {}
  rollups: RollupAccounting = []
  for size_config in (config,) + config.rollup_configs:
    try:
      checked = reconcile(size_config, with_invalid=size_config is config)
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


def rollup_lines(config, rollups: RollupAccounting) -> List[str]:
  """One line per rollup, its accounting and how it reconciled (from
  reconciliation.json), then where that report is."""
  report = {}
  if os.path.exists(config.reconciliation_path):
    with open(config.reconciliation_path, encoding='utf-8') as f:
      report = {r['window_size_s']: r for r in json.load(f)['rollups']}
  lines = []
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
    lines.append(line)
  if report:
    lines.append(f'reconciliation: {config.reconciliation_path}')
  return lines
