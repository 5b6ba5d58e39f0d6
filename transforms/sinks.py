"""Writers. Aggregates are pane-aware: a stored window holds the figures of the
highest pane index seen, whatever order panes arrive in, and a retried pane
changes nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Dict, Iterable, List

import apache_beam as beam

from transforms.model import WindowAggregate

_FILE_LOCK = threading.Lock()


def _to_json_line(record) -> str:
  obj = record.to_json_dict() if hasattr(record, 'to_json_dict') else record
  # ensure_ascii keeps payloads with lone surrogates representable, exactly.
  return json.dumps(obj, separators=(',', ':'), allow_nan=False) + '\n'


class _AppendLinesFn(beam.DoFn):

  def __init__(self, path: str):
    self._path = path

  def start_bundle(self):
    self._lines: List[str] = []

  def process(self, record) -> Iterable:
    self._lines.append(_to_json_line(record))
    return ()

  def finish_bundle(self):
    if self._lines:
      data = ''.join(self._lines).encode('utf-8')
      with _FILE_LOCK:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
          os.write(fd, data)
        finally:
          os.close(fd)
      self._lines = []


class WriteJsonLines(beam.PTransform):
  """Appends each element as one JSON line to a local file, one write per
  bundle (atomic appends, so parallel workers on one machine do not interleave)."""

  def __init__(self, path: str):
    super().__init__()
    if not path:
      raise ValueError('path must be set')
    self._path = path

  def expand(self, pcoll):
    return pcoll | 'Append' >> beam.ParDo(_AppendLinesFn(self._path))


class _ReplaceFileFn(beam.DoFn):

  def __init__(self, path: str):
    self._path = path

  def process(self, record: Dict) -> Iterable:
    tmp = f'{self._path}.tmp.{os.getpid()}.{threading.get_ident()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
      f.write('\n')
    os.replace(tmp, self._path)
    return ()


class WriteLatestJson(beam.PTransform):
  """Writes each element as the whole content of a JSON file, atomically; the
  last element written wins (for accumulating records such as the accounting)."""

  def __init__(self, path: str):
    super().__init__()
    if not path:
      raise ValueError('path must be set')
    self._path = path

  def expand(self, pcoll):
    return pcoll | 'Replace' >> beam.ParDo(_ReplaceFileFn(self._path))


AGGREGATE_COLUMNS = (
    'customer_id', 'key', 'window_start', 'window_size_ms', 'window_end', 'count',
    'sum', 'min', 'max', 'pane_index', 'timing')

SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS aggregates (
  customer_id    TEXT    NOT NULL,
  key            TEXT    NOT NULL,
  window_start   INTEGER NOT NULL,
  window_size_ms INTEGER NOT NULL,
  window_end     INTEGER NOT NULL,
  count          INTEGER NOT NULL,
  sum            REAL    NOT NULL,
  min            REAL    NOT NULL,
  max            REAL    NOT NULL,
  pane_index     INTEGER NOT NULL,
  timing         TEXT    NOT NULL,
  PRIMARY KEY (customer_id, key, window_start, window_size_ms)
)"""

SQLITE_UPSERT = """
INSERT INTO aggregates ({cols}) VALUES ({marks})
ON CONFLICT (customer_id, key, window_start, window_size_ms) DO UPDATE SET
  window_end = excluded.window_end, count = excluded.count, sum = excluded.sum,
  min = excluded.min, max = excluded.max, pane_index = excluded.pane_index,
  timing = excluded.timing
WHERE excluded.pane_index > aggregates.pane_index""".format(
    cols=', '.join(AGGREGATE_COLUMNS), marks=', '.join('?' * len(AGGREGATE_COLUMNS)))


def aggregate_row(agg: WindowAggregate) -> tuple:
  return (
      agg.customer_id, agg.key, agg.window_start, agg.window_end - agg.window_start,
      agg.window_end, agg.count, agg.sum, agg.min, agg.max, agg.pane_index, agg.timing)


class _UpsertSqliteFn(beam.DoFn):

  def __init__(self, path: str):
    self._path = path

  def setup(self):
    self._conn = sqlite3.connect(self._path, timeout=60, check_same_thread=False)
    with self._conn:
      self._conn.execute(SQLITE_DDL)

  def start_bundle(self):
    self._rows: List[tuple] = []

  def process(self, agg: WindowAggregate) -> Iterable:
    self._rows.append(aggregate_row(agg))
    return ()

  def finish_bundle(self):
    if self._rows:
      with self._conn:
        self._conn.executemany(SQLITE_UPSERT, self._rows)
      self._rows = []

  def teardown(self):
    self._conn.close()


class UpsertSqlite(beam.PTransform):
  """Keeps one row per ``(customer_id, key, window_start, window_size_ms)`` in
  a SQLite file: the pane with the highest index wins, batched per bundle."""

  def __init__(self, path: str):
    super().__init__()
    if not path:
      raise ValueError('path must be set')
    self._path = path

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return aggregates | 'Upsert' >> beam.ParDo(_UpsertSqliteFn(self._path))

