"""What each sink of a run holds for a range of windows, and the rows a
restatement adds to it through the sink's own pane-aware upsert.

A sink is the run folder's ``aggregates.jsonl`` (the files), its SQLite
database, or its PostgreSQL table: each reads back its final row per
``(customer_id, key, window)`` of the range, and ``add`` writes rows that
supersede them (a higher ``pane_index``). The files are rewritten whole,
through a temporary file renamed over the old one.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Dict, Iterable, List, Optional

from transforms.connectors.postgres import postgres_aggregates_ddl, postgres_connect, postgres_upsert
from transforms.connectors.sinks import (
    SQLITE_DDL, SQLITE_UPSERT, aggregate_row, check_identifier)
from transforms.connectors.writers import json_line
from transforms.rules.model import WindowAggregate, WindowKey, final_panes_of
from transforms.rules.restatement import RestateRange

_READ_COLUMNS = ('customer_id', 'key', 'window_start', 'window_end', 'count', 'sum', 'min',
                 'max', 'pane_index', 'timing')


class Sink:
  """One place a run's aggregates are stored; ``customer_id``: the one customer
  whose rows it takes (None: every customer's)."""
  name = ''
  customer_id: Optional[str] = None

  def takes(self, customer_id: str) -> bool:
    return self.customer_id is None or customer_id == self.customer_id

  def finals(self, span: RestateRange, size_ms: int) -> Dict[WindowKey, dict]:
    raise NotImplementedError

  def add(self, rows: List[WindowAggregate]) -> None:
    raise NotImplementedError


def _in_span(finals: Dict[WindowKey, dict], span: RestateRange, size_ms: int,
             customer_id: Optional[str]) -> Dict[WindowKey, dict]:
  return {w: row for w, row in finals.items()
          if span.holds(w[2]) and w[3] - w[2] == size_ms
          and (customer_id is None or w[0] == customer_id)}


class FilesSink(Sink):
  """The run folder's aggregates.jsonl."""
  name = 'files'

  def __init__(self, path: str):
    self.path = path

  def _panes(self) -> Iterable[dict]:
    with open(self.path, encoding='utf-8') as f:
      for line in f:
        if line.strip():
          yield json.loads(line)

  def finals(self, span: RestateRange, size_ms: int) -> Dict[WindowKey, dict]:
    return _in_span(final_panes_of(self._panes()), span, size_ms, None)

  def add(self, rows: List[WindowAggregate]) -> None:
    if not rows:
      return
    with open(self.path, 'rb') as f:
      old = f.read()
    temporary = self.path + '.restating'
    with open(temporary, 'wb') as f:
      f.write(old)
      if old and not old.endswith(b'\n'):
        f.write(b'\n')
      f.write(''.join(json_line(row) for row in rows).encode('ascii'))
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, self.path)


class SqliteSink(Sink):
  """A run's SQLite database (its ``aggregates`` table)."""
  name = 'sqlite'

  def __init__(self, path: str):
    self.path = path

  def finals(self, span: RestateRange, size_ms: int) -> Dict[WindowKey, dict]:
    if not os.path.exists(self.path):
      return {}
    with sqlite3.connect(f'file:{self.path}?mode=ro', uri=True) as db:
      if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'aggregates'").fetchone():
        return {}
      rows = db.execute(
          f'SELECT {", ".join(_READ_COLUMNS)} FROM aggregates WHERE window_size_ms = ? '
          'AND window_start >= ? AND window_start < ?', (size_ms, span.start_ms, span.end_ms))
      return {(r[0], r[1], r[2], r[3]): dict(zip(_READ_COLUMNS, r)) for r in rows}

  def add(self, rows: List[WindowAggregate]) -> None:
    with sqlite3.connect(self.path) as db:
      db.execute(SQLITE_DDL)
      db.executemany(SQLITE_UPSERT, [aggregate_row(row) for row in rows])


class PostgresSink(Sink):
  """A PostgreSQL aggregates table, scoped to the run's customer if it had one."""
  name = 'postgres'

  def __init__(self, dsn: str, table: str, customer_id: Optional[str]):
    self.dsn = dsn
    self.table = check_identifier(table)
    self.customer_id = customer_id

  def finals(self, span: RestateRange, size_ms: int) -> Dict[WindowKey, dict]:
    from psycopg import sql
    with postgres_connect(self.dsn) as db:
      if db.execute('SELECT to_regclass(quote_ident(%s))', (self.table,)).fetchone()[0] is None:
        return {}
      query = sql.SQL(
          'SELECT {cols} FROM {table} WHERE window_size_ms = %s AND window_start >= %s '
          'AND window_start < %s').format(
              cols=sql.SQL(', ').join(map(sql.Identifier, _READ_COLUMNS)),
              table=sql.Identifier(self.table))
      rows = db.execute(query, (size_ms, span.start_ms, span.end_ms)).fetchall()
    finals = {(r[0], r[1], r[2], r[3]): dict(zip(_READ_COLUMNS, r)) for r in rows}
    return _in_span(finals, span, size_ms, self.customer_id)

  def add(self, rows: List[WindowAggregate]) -> None:
    with postgres_connect(self.dsn) as db:
      db.execute(postgres_aggregates_ddl(self.table))
      with db.cursor() as cursor:
        cursor.executemany(postgres_upsert(self.table), [aggregate_row(row) for row in rows])


