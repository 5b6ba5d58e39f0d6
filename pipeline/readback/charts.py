"""The run report's charts, drawn with matplotlib as static SVG.

Static SVG shows in any browser, offline, with no JavaScript, where plotly or
altair would inline megabytes of script into every report. Each chart is made
from ``pipeline.readback.outputs.RunOutputs`` and is left out when the outputs hold
nothing for it (no lateness or watermark history without a replay, no
reconciliation without a rollup).
"""

from __future__ import annotations

import collections
import datetime
import io
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np

from pipeline.readback.outputs import (
    Breakdown, RunOutputs, breakdown, slowest_source)
from transforms.rules.model import AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.rules.restatement import RESTATED

#: Pane timings in firing order.
TIMINGS = ('EARLY', 'ON_TIME', 'LATE', RESTATED)
COLORS = {INVALID: '#c0392b', TOO_LATE: '#e67e22', DUPLICATE: '#95a5a6',
          AGGREGATED: '#27ae60', 'admitted or duplicate': '#a9dfbf',
          'EARLY': '#5dade2', 'ON_TIME': '#27ae60', 'LATE': '#e67e22', RESTATED: '#8e44ad'}



def _plt():
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot
  pyplot.rcParams.update({'font.size': 9, 'svg.fonttype': 'none', 'axes.spines.top': False,
                          'axes.spines.right': False})
  return pyplot


def _svg(fig) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='svg', bbox_inches='tight')
  _plt().close(fig)
  return buffer.getvalue().decode('utf-8')


def _utc(millis: float) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc).replace(tzinfo=None)


def _stacked_bars(ax, groups: Dict[str, Dict[str, int]], outcomes: Iterable[str]) -> None:
  names = sorted(groups)
  left = [0] * len(names)
  for outcome in outcomes:
    values = [groups[n].get(outcome, 0) for n in names]
    if any(values):
      ax.barh(names, values, left=left, color=COLORS[outcome], label=outcome)
      left = [a + b for a, b in zip(left, values)]
  ax.invert_yaxis()
  _counts(ax.xaxis)
  _legend_outside(ax)


def _counts(axis) -> None:
  """Ticks at whole numbers only: the axis counts messages, panes or windows."""
  from matplotlib.ticker import MaxNLocator
  axis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax, **kwargs) -> None:
  """The chart's legend beside it; none when nothing was drawn (an empty run)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False, **kwargs)


#: A chart over event time has one bin per window, up to this many; wider bins
#: (whole windows each) beyond.
MAX_BINS = 200


def _window_edges(first_ms: int, last_ms: int, size_ms: int) -> List[int]:
  """Bin edges (epoch ms) from the window of ``first_ms`` to the end of the
  window of ``last_ms``, ``MAX_BINS`` bins at most."""
  low = first_ms // size_ms * size_ms
  high = last_ms // size_ms * size_ms + size_ms
  step = size_ms * -(-(high - low) // size_ms // MAX_BINS)
  return list(range(low, high + step, step))


class Chart(NamedTuple):
  title: str
  svg: str
  caption: str


def accounting_chart(outputs: RunOutputs, split: Breakdown) -> Chart:
  plt = _plt()
  rows = 1 + bool(split.by_source) + bool(split.by_customer)
  fig, axes = plt.subplots(rows, 1, figsize=(8, 1.4 + 1.6 * rows + 0.18 * (
      len(split.by_source) + len(split.by_customer))), squeeze=False)
  axes = [a[0] for a in axes]
  total = {'all messages': {k: outputs.accounting.get(k, 0) for k in CATEGORIES}}
  _stacked_bars(axes[0], total, (AGGREGATED, DUPLICATE, TOO_LATE, INVALID))
  axes[0].set_title(f'received {outputs.accounting.get(RECEIVED, 0):,}', loc='left')
  row = 1
  if split.by_source:
    outcomes = ((split.merged,) if split.merged else ()) + (DUPLICATE, TOO_LATE, INVALID)
    _stacked_bars(axes[row], split.by_source, outcomes)
    axes[row].set_title('per source', loc='left')
    row += 1
  if split.by_customer:
    _stacked_bars(axes[row], split.by_customer, (AGGREGATED, DUPLICATE, TOO_LATE))
    axes[row].set_title('per customer (invalid payloads name no customer)', loc='left')
  axes[-1].set_xlabel('messages')
  fig.tight_layout()
  caption = ('Every received message is counted once: invalid, too late, duplicate or '
             'aggregated. ')
  if split.merged == 'admitted or duplicate':
    caption += ('This run did not record its duplicates one by one, so per source '
                'they are counted together with the aggregated messages.')
  elif not split.by_source:
    caption += 'Per source: only dead letters name theirs (the input was not a replay).'
  return Chart('Accounting', _svg(fig), caption)


def dead_letter_chart(outputs: RunOutputs) -> Optional[Chart]:
  if not outputs.dead_letters and not outputs.duplicates:
    return None
  plt = _plt()
  times: Dict[str, List[int]] = collections.defaultdict(list)
  unreadable = 0
  for record, parsed in zip(outputs.letters(), outputs.letter_fields):
    if parsed is None:
      unreadable += 1
    else:
      times[record['reason']].append(parsed[4])
  fig, ax = plt.subplots(figsize=(8, 3))
  reasons = [r for r in (TOO_LATE, DUPLICATE) if times.get(r)]
  if reasons:
    edges = [_utc(t) for t in _window_edges(
        min(min(v) for v in times.values()), max(max(v) for v in times.values()),
        outputs.window_size_s * 1000)]
    ax.hist([[_utc(t) for t in times[r]] for r in reasons], bins=edges, stacked=True,
            color=[COLORS[r] for r in reasons], label=reasons)
    _legend_outside(ax)
  ax.set_xlabel('event time (UTC)')
  ax.set_ylabel('messages')
  _counts(ax.yaxis)
  fig.autofmt_xdate()
  drawn = {(TOO_LATE,): 'Too-late messages', (DUPLICATE,): 'Duplicates',
           (TOO_LATE, DUPLICATE): 'Too-late messages and duplicates'}.get(tuple(reasons))
  caption = f'{drawn} by the window their event time falls in. ' if drawn else ''
  if outputs.duplicates is None:
    caption += 'This run did not record its duplicates one by one: they are not drawn. '
  if unreadable:
    caption += (f'{unreadable:,} invalid payloads carry no readable event time and are not '
                'drawn (listed by reason below).')
  return Chart('Dead letters over event time', _svg(fig), caption.strip())


def lateness(outputs: RunOutputs) -> Optional[Tuple[List[float], List[float]]]:
  """For a replay: the messages that arrived after their window's end, as
  seconds the watermark had passed that end, split into those the run
  accepted and those it dead-lettered as too late (found by their payload
  among the dead letters). None when the run did not read a replay."""
  if outputs.replay_late is None:
    return None
  within = [behind for behind, too_late in outputs.replay_late if not too_late]
  return within, [behind for behind, too_late in outputs.replay_late if too_late]


def lateness_chart(outputs: RunOutputs) -> Optional[Chart]:
  split = lateness(outputs)
  if not split or not any(split):
    return None
  within, too_late = split
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 3))
  ax.hist([within, too_late], bins=60, stacked=True,
          color=[COLORS[AGGREGATED], COLORS[TOO_LATE]],
          label=['accepted (a late pane or a duplicate)', 'too late (dead letter)'])
  ax.axvline(outputs.allowed_lateness_s, color='black', linestyle='--', linewidth=1)
  ax.annotate(f'allowed lateness {outputs.allowed_lateness_s} s',
              (outputs.allowed_lateness_s, ax.get_ylim()[1] * 0.9), xytext=(4, 0),
              textcoords='offset points')
  ax.set_xlabel('seconds the watermark was past the window end when the message arrived')
  ax.set_ylabel('messages')
  _counts(ax.yaxis)
  _legend_outside(ax)
  return Chart('Lateness', _svg(fig),
               f'{len(within) + len(too_late):,} messages arrived after their window had '
               f'ended: {len(within):,} were accepted, {len(too_late):,} were too late.')


def watermark_chart(outputs: RunOutputs) -> Optional[Chart]:
  history = outputs.replay_watermarks
  if not history or not any(history.values()):
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 3))
  for source in sorted(history):
    points = history[source]
    if points:
      ax.step([n for n, _ in points], [_utc(m) for _, m in points], where='post', label=source)
  ax.set_xlabel('messages arrived')
  ax.set_ylabel('watermark (UTC)')
  _legend_outside(ax, title='source')
  caption = ('Each source\'s watermark as the replay went on; the pipeline watermark is the '
             'lowest of them, so the source lowest here held every window back.')
  lag = slowest_source(outputs)
  if lag is not None:
    caption += (f' At the end, source {lag.slowest} was {lag.seconds:,.0f} s behind source '
                f'{lag.ahead}' + (f', more than the allowed lateness ({outputs.allowed_lateness_s} s)'
                                  if lag.seconds > outputs.allowed_lateness_s else '') + '.')
  return Chart('Watermark per source', _svg(fig), caption)


def completeness_chart(outputs: RunOutputs) -> Optional[Chart]:
  if not outputs.panes:
    return None
  plt = _plt()
  counts: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for pane in outputs.panes:
    counts[pane['window_start']][pane['timing']] += 1
  starts = sorted(counts)
  size_ms = outputs.window_size_s * 1000
  edges = _window_edges(starts[0], starts[-1], size_ms)
  fig, ax = plt.subplots(figsize=(8, 3))
  # a filled outline per timing, stacked: thousands of windows draw as fast as a few
  timings = [t for t in TIMINGS if any(counts[s][t] for s in starts)]
  tallest = 0.0
  if timings:
    heights, _, _ = ax.hist(
        [[_utc(s) for s in starts]] * len(timings), bins=[_utc(t) for t in edges],
        stacked=True, weights=[[counts[s][t] for s in starts] for t in timings],
        histtype='stepfilled', color=[COLORS[t] for t in timings], label=timings)
    tallest = float(np.atleast_2d(heights)[-1].max())  # stacked: the last is the sum
  ax.set_xlabel('window start (UTC)')
  windows = (edges[1] - edges[0]) // size_ms
  per = 'window' if windows == 1 else f'{windows} windows'
  ax.set_ylabel(f'panes per {per} (all keys)')
  ax.set_ylim(0, tallest * 1.08 or 1)  # the tallest bin whole, with room above it
  _counts(ax.yaxis)
  _legend_outside(ax)
  fig.autofmt_xdate()
  finals = outputs.final_panes()
  missing = sum(1 for p in finals.values() if p['timing'] == 'EARLY')
  return Chart('Window completeness', _svg(fig),
               f'Panes per {per} by timing: {len(finals):,} windows (customer, key, window), '
               f'{len(outputs.panes):,} panes; {missing:,} windows ended on an EARLY pane '
               '(a stopped run\'s windows still open).')


def rollup_chart(outputs: RunOutputs) -> Optional[Chart]:
  rollups = (outputs.reconciliation or {}).get('rollups') or []
  if not rollups:
    return None
  plt = _plt()
  names = [f'{r["window_size_s"]} s rollup' for r in rollups]
  panels = (
      ('windows', (('windows_with_differences', 'windows that differ', '#5dade2'),
                   ('windows_unexplained', 'windows unexplained', COLORS[INVALID]))),
      ('events', (('events_only_in_rollup', 'events only the rollup accepted',
                   COLORS[AGGREGATED]),
                  ('events_only_in_primary', 'events only the primary accepted',
                   COLORS[TOO_LATE]))))
  fig, axes = plt.subplots(2, 1, figsize=(8, 1.6 + 1.2 * len(rollups)), squeeze=False)
  for ax, (unit, fields) in zip((a[0] for a in axes), panels):
    height = 0.8 / len(fields)
    for i, (field, label, color) in enumerate(fields):
      ax.barh([n + i * height for n in range(len(names))], [r.get(field, 0) for r in rollups],
              height=height, color=color, label=label)
    ax.set_yticks([n + 0.4 - height / 2 for n in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_xlim(0, max(1, *(r.get(f, 0) for r in rollups for f, _, _ in fields)) * 1.05)
    _counts(ax.xaxis)
    _legend_outside(ax)
  fig.tight_layout()
  return Chart('Rollup reconciliation', _svg(fig),
               (outputs.reconciliation or {}).get('rule', ''))


def restatement_chart(outputs: RunOutputs) -> Optional[Chart]:
  """Each restated window's count before and after, summed over its keys."""
  changed = [w for audit in outputs.restatements for w in audit.get('windows', [])
             if w.get('written')]
  if not changed:
    return None
  plt = _plt()
  before: Dict[int, int] = collections.Counter()
  after: Dict[int, int] = collections.Counter()
  for window in changed:
    before[window['window_start']] += (window['before'] or {}).get('count', 0)
    after[window['window_start']] += window['after']['count']
  starts = sorted(after)
  fig, ax = plt.subplots(figsize=(8, 3))
  width = outputs.window_size_s / 86400 * 0.4
  ax.bar([_utc(s) for s in starts], [before[s] for s in starts], width=width, align='edge',
         color=COLORS['ON_TIME'], label='live (before)')
  ax.bar([_utc(s + outputs.window_size_s * 400) for s in starts], [after[s] for s in starts],
         width=width, align='edge', color=COLORS[RESTATED], label='restated (after)')
  ax.set_xlabel('window start (UTC)')
  ax.set_ylabel('events (corrected keys)')
  ax.set_ylim(0, max(after.values()) * 1.08 or 1)
  _counts(ax.yaxis)
  _legend_outside(ax)
  fig.autofmt_xdate()
  recovered = sum(a.get('too_late_recovered', 0) for a in outputs.restatements)
  moved = sum(len(w['removed']) for w in changed)
  ranges = ', '.join(f'[{a.get("from")}, {a.get("to")})' for a in outputs.restatements)
  return Chart('Restated windows', _svg(fig),
               f'{len(changed):,} (customer, key, window) corrected by restating {ranges}: '
               f'{recovered:,} events too late live now counted, {moved:,} ids counted once '
               'in their first copy\'s window instead of a later copy\'s.')


def charts(outputs: RunOutputs) -> List[Chart]:
  made = [accounting_chart(outputs, breakdown(outputs)), dead_letter_chart(outputs),
          lateness_chart(outputs), watermark_chart(outputs), completeness_chart(outputs),
          rollup_chart(outputs), restatement_chart(outputs)]
  return [c for c in made if c is not None]


