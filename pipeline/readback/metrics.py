"""A run's figures as Prometheus metrics (``metrics.prom``).

``run_metrics`` turns ``pipeline.readback.outputs.RunOutputs`` into a prometheus_client
registry; ``templates/monitoring/alerts.yml`` holds the alerting rules over
these series, and over the same counters a Flink job reports through Flink's
Prometheus reporter.
"""

from __future__ import annotations

import collections

from pipeline.readback.outputs import RunOutputs, watermark_lags
from pipeline.runfolder import names
from transforms.rules.model import CATEGORIES

METRICS_NAME = names.METRICS


def run_metrics(outputs: RunOutputs):
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
  Gauge('tidemark_unaccounted_events', 'received minus every outcome: must be 0',
        ['customer', 'source'], registry=registry).labels(**scope).set(outputs.unaccounted)
  dead = Counter('tidemark_dead_letters', 'Dead letters by reason and source',
                 ['reason', 'source'], registry=registry)
  for (reason, source), count in collections.Counter(
      (d['reason'], d['source']) for d in outputs.dead_letters).items():
    dead.labels(reason=reason, source=source).inc(count)
  if outputs.replay_received is not None:
    received = Counter('tidemark_received', 'Messages received, by source (replays)',
                       ['source'], registry=registry)
    for source, count in outputs.replay_received.items():
      received.labels(source=source).inc(count)
  panes = Counter('tidemark_panes', 'Panes written, by timing', ['timing'], registry=registry)
  for timing, count in collections.Counter(p['timing'] for p in outputs.panes).items():
    panes.labels(timing=timing).inc(count)
  finals = outputs.final_panes().values()
  # once a bounded input ended every window is closed; a stopped run's open
  # windows are those whose last pane is EARLY
  complete = outputs.status == 'complete'
  still_open = 0 if complete else sum(
      1 for p in finals if p['timing'] == 'EARLY')
  Gauge('tidemark_open_windows', 'Windows not closed yet (0 once a bounded input ended; '
        'a stopped run: windows whose last pane is EARLY)', registry=registry).set(still_open)
  Counter('tidemark_windows_closed', 'Windows that fired their final pane',
          registry=registry).inc(len(finals) - still_open)
  if outputs.replay_watermarks:
    lag = Gauge('tidemark_watermark_lag_seconds',
                "How far a source's watermark is behind the most advanced source's",
                ['source'], registry=registry)
    lags = watermark_lags(outputs)
    for source in outputs.replay_watermarks:
      lag.labels(source=source).set(lags.get(source, 0))
  Gauge('tidemark_allowed_lateness_seconds', 'The allowed lateness of the run',
        registry=registry).set(settings['allowed_lateness_s'])
  Gauge('tidemark_window_size_seconds', 'The window size of the run',
        registry=registry).set(settings['window_size_s'])
  Gauge('tidemark_run_complete', '1 when the run completed and reconciled, else 0',
        registry=registry).set(int(complete and bool(outputs.manifest.get('reconciled'))))
  if outputs.restatements:
    restated = Counter('tidemark_restated_windows', 'Windows a restatement corrected',
                       registry=registry)
    changes = Counter('tidemark_restated_events', 'Event ids a restatement added to a window '
                      'or removed from it, by reason', ['reason'], registry=registry)
    for audit in outputs.restatements:
      for window in audit.get('windows', []):
        restated.inc(int(bool(window.get('written'))))
        for change in window.get('added', []) + window.get('removed', []):
          changes.labels(reason=change['reason']).inc()
  if outputs.manifest.get('peak_rss_bytes'):
    Gauge('tidemark_peak_resident_memory_bytes', 'Peak resident memory of the launcher and '
          'its local workers', registry=registry).set(outputs.manifest['peak_rss_bytes'])
  return registry


# --- writing -----------------------------------------------------------------------
