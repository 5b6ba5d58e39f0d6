"""Pane-aware sinks: whatever order panes arrive in, and however often, the
stored row of a window is its highest pane."""

import random
import sqlite3

import apache_beam as beam
from apache_beam.testing import test_pipeline

from transforms.rules.model import WindowAggregate
from transforms.connectors.sinks import UpsertSqlite


def panes(window_start):
  return [
      WindowAggregate('finserve', 'AAPL', window_start, window_start + 60000, n, float(n),
                      1.0, float(n), i, timing)
      for i, (n, timing) in enumerate([(1, 'EARLY'), (3, 'ON_TIME'), (4, 'LATE'), (6, 'LATE')])
  ]


def test_out_of_order_and_repeated_panes_leave_the_highest_pane(tmp_path):
  db = str(tmp_path / 'agg.sqlite')
  shuffled = panes(0) * 2 + panes(60000)
  random.Random(3).shuffle(shuffled)
  # the highest pane first, then stale ones: they must not win
  ordered = [panes(120000)[-1]] + panes(120000)[:-1]
  with test_pipeline.TestPipeline(runner='DirectRunner') as p:
    _ = p | beam.Create(shuffled + ordered, reshuffle=False) | UpsertSqlite(db)
  with sqlite3.connect(db) as conn:
    rows = conn.execute(
        'SELECT window_start, window_size_ms, count, pane_index, timing FROM aggregates '
        'ORDER BY window_start').fetchall()
  assert rows == [(0, 60000, 6, 3, 'LATE'), (60000, 60000, 6, 3, 'LATE'),
                  (120000, 60000, 6, 3, 'LATE')]


def test_a_retried_pane_changes_nothing(tmp_path):
  db = str(tmp_path / 'agg.sqlite')
  for batch in ([panes(0)[1]], [panes(0)[1]], [panes(0)[0]]):
    with test_pipeline.TestPipeline(runner='DirectRunner') as p:
      _ = p | beam.Create(batch) | UpsertSqlite(db)
  with sqlite3.connect(db) as conn:
    assert conn.execute('SELECT count, pane_index FROM aggregates').fetchall() == [(3, 1)]
