"""The run report: what a run's outputs say, as a page and as metrics.

  python -m pipeline report OUTPUT_DIR [--out PATH] [--serve HOST:PORT]

Reads a run's folder (``run.json``, the accounting, the panes, the dead
letters, the duplicates and the reconciliation when the run wrote them, and a
replay input when it is still there) and writes two files into it:

* ``report.html``: one self-contained page (charts inline as SVG, no network):
  the accounting as a picture, in total, per source and per customer; dead
  letters by reason over event time; how late the late messages were, against
  the allowed lateness; each source's watermark over the replay; every
  window's panes by timing; and each rollup's reconciliation;
* ``metrics.prom``: the same figures in Prometheus' text format
  (``tidemark_events_total{outcome=...}`` and friends, see ``metrics``), for a
  textfile collector or any scrape; ``templates/monitoring/alerts.yml`` holds
  the alerting rules over them.

Every run writes both when it commits its outputs; this command writes them
again for any folder, and with ``--serve`` keeps serving the folder's metrics
at ``/metrics`` (read afresh from its files at every scrape) and the page at
``/``, for a Prometheus to scrape. The charts are drawn with matplotlib: static SVG that
any browser shows offline and that needs no JavaScript, where plotly or
altair would inline megabytes of script into every report.
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import html
import io
import json
import os
import sys
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from transforms.files import file_identity
from transforms.model import AGGREGATED, CATEGORIES, DUPLICATE, INVALID, RECEIVED, TOO_LATE
from transforms.parse import InvalidPayload, parse_payload
from transforms.replay import Messages, ReplayError, compile_replay, watermark_history

REPORT_NAME = 'report.html'
METRICS_NAME = 'metrics.prom'
#: Pane timings in firing order.
TIMINGS = ('EARLY', 'ON_TIME', 'LATE')
COLORS = {INVALID: '#c0392b', TOO_LATE: '#e67e22', DUPLICATE: '#95a5a6',
          AGGREGATED: '#27ae60', 'admitted or duplicate': '#a9dfbf',
          'EARLY': '#5dade2', 'ON_TIME': '#27ae60', 'LATE': '#e67e22'}


class ReportError(ValueError):
  """The folder is not a Tidemark run's output folder."""


class RunOutputs(NamedTuple):
  """What one run's folder holds, read once."""
  directory: str
  manifest: dict
  accounting: Dict[str, int]
  panes: List[dict]
  dead_letters: List[dict]
  duplicates: Optional[List[dict]]  # None: the run did not record them
  reconciliation: Optional[dict]
  #: the replay the run read, if it is still there unchanged: its messages
  #: (source, payload, pipeline watermark at arrival) and each source's
  #: watermark history (``transforms.replay.watermark_history``)
  replay_messages: Optional[list]
  replay_watermarks: Optional[Dict[str, List[Tuple[int, int]]]]

  @property
  def window_size_s(self) -> int:
    return self.manifest['settings']['window_size_s']

  @property
  def allowed_lateness_s(self) -> int:
    return self.manifest['settings']['allowed_lateness_s']

  @property
  def status(self) -> str:
    return self.manifest.get('status', 'unknown')

  def final_panes(self) -> Dict[tuple, dict]:
    """Each window's pane with the highest index."""
    finals: Dict[tuple, dict] = {}
    for pane in self.panes:
      window = (pane['customer_id'], pane['key'], pane['window_start'])
      if window not in finals or pane['pane_index'] > finals[window]['pane_index']:
        finals[window] = pane
    return finals


def _json_lines(path: str) -> Optional[List[dict]]:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _replay(manifest: dict):
  """The replay's messages and watermark history, or (None, None) when the run
  did not read a replay or the file is gone or changed since."""
  described = manifest.get('input') or {}
  path = described.get('path')
  if described.get('kind') != 'replay' or not path or not os.path.exists(path):
    return None, None
  if 'sha256' in described and file_identity(path).get('sha256') != described['sha256']:
    return None, None
  try:
    replay = compile_replay(path)
    history, _ = watermark_history(path)
  except (ReplayError, OSError):
    return None, None
  messages = [m for step in replay.steps if isinstance(step, Messages) for m in step.batch]
  return messages, history


def load(output_dir: str) -> RunOutputs:
  """Reads a run's folder; raises ReportError when it has no ``run.json``."""
  manifest = _json(os.path.join(output_dir, 'run.json'))
  if manifest is None or 'settings' not in manifest:
    raise ReportError(f'{output_dir}: no run.json with settings: not a Tidemark output folder')
  accounting = _json(os.path.join(output_dir, 'accounting.json')) or dict.fromkeys(CATEGORIES, 0)
  messages, history = _replay(manifest)
  return RunOutputs(
      directory=output_dir, manifest=manifest, accounting=accounting,
      panes=_json_lines(os.path.join(output_dir, 'aggregates.jsonl')) or [],
      dead_letters=_json_lines(os.path.join(output_dir, 'dead_letter.jsonl')) or [],
      duplicates=_json_lines(os.path.join(output_dir, 'duplicates.jsonl')),
      reconciliation=_json(os.path.join(output_dir, 'reconciliation.json')),
      replay_messages=messages, replay_watermarks=history)


def _payload(data: str) -> Optional[tuple]:
  """``(event_id, customer_id, key, value, event_time)``, or None if invalid."""
  try:
    return parse_payload(data)
  except InvalidPayload:
    return None


# --- the figures ---------------------------------------------------------------


class Breakdown(NamedTuple):
  """The accounting split by source and by customer, as far as the outputs
  tell: ``{group: {outcome: count}}``."""
  by_source: Dict[str, Dict[str, int]]
  by_customer: Dict[str, Dict[str, int]]
  #: what the per-source split could not separate (duplicates are only known
  #: per source when the run recorded them): the name of the merged outcome
  merged: Optional[str]


def breakdown(outputs: RunOutputs) -> Breakdown:
  """Dead letters and duplicates name their source and (when the payload
  parses) customer; final panes name their customer; a replay names every
  message's source. What is left per source once the dead letters and
  duplicates are taken out is ``aggregated`` (or ``admitted or duplicate``
  when the run did not record its duplicates)."""
  by_source: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
  by_customer: Dict[str, Dict[str, int]] = collections.defaultdict(collections.Counter)
  for record in outputs.dead_letters + (outputs.duplicates or []):
    by_source[record['source']][record['reason']] += 1
    parsed = _payload(record['data']) if record['reason'] != INVALID else None
    if parsed is not None:
      by_customer[parsed[1]][record['reason']] += 1
  for pane in outputs.final_panes().values():
    by_customer[pane['customer_id']][AGGREGATED] += pane['count']
  merged = None
  if outputs.replay_messages is not None:
    merged = AGGREGATED if outputs.duplicates is not None else 'admitted or duplicate'
    received = collections.Counter(m.source for m in outputs.replay_messages)
    for source, count in received.items():
      counts = by_source[source]
      counts[RECEIVED] = count
      counts[merged] = count - sum(counts[k] for k in (INVALID, TOO_LATE, DUPLICATE))
  return Breakdown(dict(by_source), dict(by_customer), merged)


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
  _legend_outside(ax)


def _legend_outside(ax, **kwargs) -> None:
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), frameon=False, **kwargs)


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
  for record in outputs.dead_letters + (outputs.duplicates or []):
    parsed = _payload(record['data'])
    if parsed is None:
      unreadable += 1
    else:
      times[record['reason']].append(parsed[4])
  fig, ax = plt.subplots(figsize=(8, 3))
  if times:
    # one bin per window, at most 200 (wider bins, whole windows each, beyond)
    size_ms = outputs.window_size_s * 1000
    low = min(min(v) for v in times.values()) // size_ms * size_ms
    high = max(max(v) for v in times.values()) // size_ms * size_ms + size_ms
    step = size_ms * -(-(high - low) // size_ms // 200 or 1)
    edges = [_utc(t) for t in range(low, high + step, step)]
    reasons = [r for r in (TOO_LATE, DUPLICATE) if times.get(r)]
    ax.hist([[_utc(t) for t in times[r]] for r in reasons], bins=edges, stacked=True,
            color=[COLORS[r] for r in reasons], label=reasons)
    _legend_outside(ax)
  ax.set_xlabel('event time (UTC)')
  ax.set_ylabel('messages')
  fig.autofmt_xdate()
  return Chart('Dead letters over event time', _svg(fig),
               f'Too-late and duplicate messages by the window their event time falls in. '
               f'{unreadable:,} invalid payloads carry no readable event time and are not '
               f'drawn (by source in the accounting above).')


def lateness(outputs: RunOutputs) -> Optional[Tuple[List[float], List[float]]]:
  """For a replay: the messages that arrived after their window's end, as
  seconds the watermark had passed that end, split into those the run
  accepted and those it dead-lettered as too late (found by their payload
  among the dead letters). None when the run did not read a replay."""
  if outputs.replay_messages is None:
    return None
  late = collections.Counter((d['source'], d['data']) for d in outputs.dead_letters
                             if d['reason'] == TOO_LATE)
  size_ms = outputs.window_size_s * 1000
  within: List[float] = []
  too_late: List[float] = []
  for message in outputs.replay_messages:
    if message.watermark is None:
      continue
    parsed = _payload(message.data)
    if parsed is None:
      continue
    end = parsed[4] - parsed[4] % size_ms + size_ms
    behind_s = (message.watermark - end) / 1000
    if behind_s < 0:
      continue
    if late[(message.source, message.data)] > 0:
      late[(message.source, message.data)] -= 1
      too_late.append(behind_s)
    else:
      within.append(behind_s)
  return within, too_late


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
  return Chart('Watermark per source', _svg(fig),
               'Each source\'s watermark as the replay went on; the pipeline watermark '
               'is the lowest of them, so the source lowest here held every window back.')


def completeness_chart(outputs: RunOutputs) -> Optional[Chart]:
  if not outputs.panes:
    return None
  plt = _plt()
  counts: Dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
  for pane in outputs.panes:
    counts[pane['window_start']][pane['timing']] += 1
  starts = sorted(counts)
  fig, ax = plt.subplots(figsize=(8, 3))
  bottom = [0] * len(starts)
  width = outputs.window_size_s / 86400 * 0.8
  for timing in TIMINGS:
    values = [counts[s][timing] for s in starts]
    if any(values):
      ax.bar([_utc(s) for s in starts], values, width=width, bottom=bottom,
             color=COLORS[timing], label=timing, align='edge')
      bottom = [a + b for a, b in zip(bottom, values)]
  ax.set_xlabel('window start (UTC)')
  ax.set_ylabel('panes (all keys)')
  _legend_outside(ax)
  fig.autofmt_xdate()
  finals = outputs.final_panes()
  missing = sum(1 for p in finals.values() if p['timing'] == 'EARLY')
  return Chart('Window completeness', _svg(fig),
               f'Panes per window by timing: {len(finals):,} windows (customer, key, window), '
               f'{len(outputs.panes):,} panes; {missing:,} windows ended on an EARLY pane '
               '(a stopped run\'s windows still open).')


def rollup_chart(outputs: RunOutputs) -> Optional[Chart]:
  rollups = (outputs.reconciliation or {}).get('rollups') or []
  if not rollups:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rollups)))
  names = [f'{r["window_size_s"]} s' for r in rollups]
  fields = (('windows_with_differences', 'windows that differ', '#5dade2'),
            ('events_only_in_rollup', 'events only the rollup accepted', COLORS[AGGREGATED]),
            ('events_only_in_primary', 'events only the primary accepted', COLORS[TOO_LATE]),
            ('windows_unexplained', 'windows unexplained', COLORS[INVALID]))
  height = 0.8 / len(fields)
  for i, (field, label, color) in enumerate(fields):
    ax.barh([n + i * height for n in range(len(names))], [r.get(field, 0) for r in rollups],
            height=height, color=color, label=label)
  ax.set_yticks([n + 0.4 - height / 2 for n in range(len(names))], names)
  ax.invert_yaxis()
  _legend_outside(ax)
  return Chart('Rollup reconciliation', _svg(fig),
               (outputs.reconciliation or {}).get('rule', ''))


def charts(outputs: RunOutputs) -> List[Chart]:
  made = [accounting_chart(outputs, breakdown(outputs)), dead_letter_chart(outputs),
          lateness_chart(outputs), watermark_chart(outputs), completeness_chart(outputs),
          rollup_chart(outputs)]
  return [c for c in made if c is not None]


# --- the page --------------------------------------------------------------------

_STYLE = '''
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em; color: #222 }
h1 { font-size: 1.5em; margin-bottom: 0.2em } h2 { font-size: 1.15em; margin-top: 2em }
.status { padding: 0.6em 1em; border-radius: 4px; font-weight: 600 }
.ok { background: #e8f6ee; color: #1e7d45 } .bad { background: #fdecea; color: #a93226 }
table { border-collapse: collapse } td, th { padding: 0.2em 0.8em; text-align: right }
th { text-align: left; font-weight: 500; color: #555 } figure { margin: 1em 0 }
figure img { max-width: 100%; height: auto } figcaption { color: #555 }
.note { color: #777 }
'''

# Marks the page once the browser has decoded every chart: a check (and a
# reader) can tell a page whose charts rendered from one whose did not.
_SCRIPT = '''
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('figure img');
  var drawn = Array.prototype.filter.call(charts, function (i) {
    return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute('data-charts', charts.length);
  document.documentElement.setAttribute('data-charts-rendered', drawn);
});
'''


def _table(rows: Iterable[Tuple[str, object]]) -> str:
  return '<table>' + ''.join(
      f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
      for k, v in rows) + '</table>'


def render_html(outputs: RunOutputs, made: List[Chart]) -> str:
  manifest, accounting = outputs.manifest, outputs.accounting
  settings = manifest['settings']
  unaccounted = accounting.get(RECEIVED, 0) - sum(
      accounting.get(k, 0) for k in CATEGORIES if k != RECEIVED)
  good = outputs.status == 'complete' and manifest.get('reconciled', False) and not unaccounted
  verdict = (f'run {outputs.status}' +
             (', reconciled' if manifest.get('reconciled') else ', NOT reconciled') +
             (f': {manifest["detail"]}' if manifest.get('detail') else ''))
  figures = ''.join(
      f'<h2>{html.escape(c.title)}</h2><figure><img alt="{html.escape(c.title)}" '
      f'src="data:image/svg+xml;base64,{base64.b64encode(c.svg.encode()).decode()}">'
      f'<figcaption>{html.escape(c.caption)}</figcaption></figure>' for c in made)
  missing = ''
  if outputs.replay_messages is None:
    missing = ('<p class="note">Lateness and watermark per source are drawn for replays: '
               'a live source\'s arrival watermarks are not in the outputs.</p>')
  rows = [(k, f'{accounting.get(k, 0):,}') for k in CATEGORIES] + [
      ('unaccounted', f'{unaccounted:,}')]
  about = [('run', manifest.get('run_id', '')), ('runner', manifest.get('runner', '')),
           ('source', settings.get('source', '')),
           ('window', f'{settings["window_size_s"]} s, allowed lateness '
                      f'{settings["allowed_lateness_s"]} s, early firing '
                      f'{settings.get("early_firing_s")} s'),
           ('started', manifest.get('started_at', '')), ('ended', manifest.get('ended_at', '')),
           ('seconds', manifest.get('seconds', ''))]
  return (
      '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
      f'<title>Tidemark run {html.escape(str(manifest.get("run_id", "")))}</title>'
      f'<style>{_STYLE}</style></head><body>'
      f'<h1>Tidemark run report</h1>'
      f'<p class="status {"ok" if good else "bad"}">{html.escape(verdict)}</p>'
      f'{_table(about)}<h2>Where every message went</h2>{_table(rows)}'
      f'{figures}{missing}<script>{_SCRIPT}</script></body></html>')


# --- metrics -----------------------------------------------------------------------


def metrics(outputs: RunOutputs):
  """The run's figures as a prometheus_client registry.

  ``tidemark_events_total`` is the exact accounting, labelled with the run's
  customer (``all`` for an unscoped run) and ``source="all"``: the outputs do
  not split every outcome by source. What they do split by source is its own
  series: dead letters by reason, the messages received (replays) and each
  source's watermark lag (replays)."""
  from prometheus_client import CollectorRegistry, Counter, Gauge
  settings = outputs.manifest['settings']
  registry = CollectorRegistry()
  scope = {'customer': settings.get('customer_id') or 'all', 'source': 'all'}
  events = Counter('tidemark_events', 'Messages by where they went (contract section 3)',
                   ['outcome', 'customer', 'source'], registry=registry)
  for outcome in CATEGORIES:
    events.labels(outcome=outcome, **scope).inc(outputs.accounting.get(outcome, 0))
  unaccounted = outputs.accounting.get(RECEIVED, 0) - sum(
      outputs.accounting.get(k, 0) for k in CATEGORIES if k != RECEIVED)
  Gauge('tidemark_unaccounted_events', 'received minus every outcome: must be 0',
        ['customer', 'source'], registry=registry).labels(**scope).set(unaccounted)
  dead = Counter('tidemark_dead_letters', 'Dead letters by reason and source',
                 ['reason', 'source'], registry=registry)
  for (reason, source), count in collections.Counter(
      (d['reason'], d['source']) for d in outputs.dead_letters).items():
    dead.labels(reason=reason, source=source).inc(count)
  if outputs.replay_messages is not None:
    received = Counter('tidemark_received', 'Messages received, by source (replays)',
                       ['source'], registry=registry)
    for source, count in collections.Counter(m.source for m in outputs.replay_messages).items():
      received.labels(source=source).inc(count)
  panes = Counter('tidemark_panes', 'Panes written, by timing', ['timing'], registry=registry)
  for timing, count in collections.Counter(p['timing'] for p in outputs.panes).items():
    panes.labels(timing=timing).inc(count)
  windows = len(outputs.final_panes())
  complete = outputs.status == 'complete'
  Gauge('tidemark_open_windows', 'Windows not closed yet (0 once a bounded input ended; '
        'a stopped run: windows whose last pane is EARLY)', registry=registry).set(
            0 if complete else sum(1 for p in outputs.final_panes().values()
                                   if p['timing'] == 'EARLY'))
  Counter('tidemark_windows_closed', 'Windows that fired their final pane',
          registry=registry).inc(windows if complete else sum(
              1 for p in outputs.final_panes().values() if p['timing'] != 'EARLY'))
  if outputs.replay_watermarks:
    lag = Gauge('tidemark_watermark_lag_seconds',
                "How far a source's watermark is behind the most advanced source's",
                ['source'], registry=registry)
    last = {s: h[-1][1] for s, h in outputs.replay_watermarks.items() if h}
    for source in outputs.replay_watermarks:
      lag.labels(source=source).set(
          (max(last.values()) - last[source]) / 1000 if source in last and last else 0)
  Gauge('tidemark_allowed_lateness_seconds', 'The allowed lateness of the run',
        registry=registry).set(settings['allowed_lateness_s'])
  Gauge('tidemark_window_size_seconds', 'The window size of the run',
        registry=registry).set(settings['window_size_s'])
  Gauge('tidemark_run_complete', '1 when the run completed and reconciled, else 0',
        registry=registry).set(int(complete and bool(outputs.manifest.get('reconciled'))))
  if outputs.manifest.get('peak_rss_bytes'):
    Gauge('tidemark_peak_resident_memory_bytes', 'Peak resident memory of the launcher and '
          'its local workers', registry=registry).set(outputs.manifest['peak_rss_bytes'])
  return registry


# --- writing -----------------------------------------------------------------------


def _write_atomically(path: str, text: str) -> None:
  temporary = f'{path}.tmp{os.getpid()}'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(temporary, path)


def write(output_dir: str, out: Optional[str] = None) -> Tuple[str, str]:
  """Writes ``report.html`` (or ``out``) and ``metrics.prom`` for a run's
  folder; returns their paths."""
  import prometheus_client
  prometheus_client.disable_created_metrics()  # a run's figures, not live series
  outputs = load(output_dir)
  page = out or os.path.join(output_dir, REPORT_NAME)
  _write_atomically(page, render_html(outputs, charts(outputs)))
  textfile = os.path.join(output_dir, METRICS_NAME)
  _write_atomically(textfile, prometheus_client.generate_latest(metrics(outputs)).decode('utf-8'))
  return page, textfile


def serve(output_dir: str, address: str) -> None:
  """Serves the folder's metrics at ``/metrics`` (from its files as they are at
  each request) and its report at ``/``, until interrupted."""
  import http.server
  import prometheus_client
  host, _, port = address.rpartition(':')

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server name)
      try:
        outputs = load(output_dir)
        if self.path.split('?')[0] == '/metrics':
          body = prometheus_client.generate_latest(metrics(outputs))
          kind = prometheus_client.CONTENT_TYPE_LATEST
        elif self.path == '/':
          body, kind = render_html(outputs, charts(outputs)).encode(), 'text/html; charset=utf-8'
        else:
          self.send_error(404)
          return
      except (ReportError, OSError, ValueError) as e:
        self.send_error(503, explain=str(e))
        return
      self.send_response(200)
      self.send_header('Content-Type', kind)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):  # scrapes are not news
      pass

  server = http.server.ThreadingHTTPServer((host or '127.0.0.1', int(port)), Handler)
  print(f'serving {output_dir}: http://{host or "127.0.0.1"}:{port}/metrics and /', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pipeline report', description=__doc__.split('\n\n')[0])
  parser.add_argument('output_dir', metavar='OUTPUT_DIR', help="a run's --output-dir")
  parser.add_argument('--out', metavar='PATH', help=f'the page (default OUTPUT_DIR/{REPORT_NAME})')
  parser.add_argument('--serve', metavar='HOST:PORT',
                      help='then serve the metrics at /metrics and the page at / until stopped')
  args = parser.parse_args(argv)
  if args.serve is not None:
    host, sep, port = args.serve.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
      parser.error(f'--serve: HOST:PORT expected, got {args.serve!r}')
  try:
    page, textfile = write(args.output_dir, args.out)
  except ReportError as e:
    print(f'tidemark: error: {e}', file=sys.stderr)
    return 2
  print(f'report: {page}\nmetrics: {textfile}', flush=True)
  if args.serve is not None:
    serve(args.output_dir, args.serve)
  return 0
