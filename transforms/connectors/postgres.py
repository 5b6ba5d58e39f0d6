"""PostgreSQL writers: pane-aware upserts of aggregates and dead letters,
scoped to one customer (see transforms.connectors.sinks), with retries."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.rules.model import DeadLetter, WindowAggregate
from transforms.connectors.sinks import (
    AGGREGATE_COLUMNS, AGGREGATE_KEY, AGGREGATE_VALUES, DEAD_LETTER_COLUMNS, row_key, row_lock_order,
    scope_rows, aggregate_row, check_customer_id, check_identifier, dead_letter_row,
    scope_dead_letters)

_LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# PostgreSQL.


class Backoff(NamedTuple):
  """Retry policy: ``attempts`` tries, sleeping ``initial_s * 2**n`` (at most
  ``max_s``) between them."""
  attempts: int = 6
  initial_s: float = 0.5
  max_s: float = 30.0

  def delays(self) -> List[float]:
    return [min(self.initial_s * 2**n, self.max_s) for n in range(self.attempts - 1)]

  def check(self) -> 'Backoff':
    if self.attempts < 1 or self.initial_s < 0 or self.max_s < self.initial_s:
      raise ValueError(f'bad retry policy {self}')
    return self


def with_backoff(action: Callable[[], Any], backoff: Backoff, what: str,
                 retry_on: tuple, sleep=time.sleep) -> Any:
  """Runs ``action`` until it succeeds, retrying ``retry_on`` errors with
  exponential backoff; the last error propagates."""
  delays = backoff.delays()
  for attempt in range(backoff.attempts):
    try:
      return action()
    except retry_on as e:
      if attempt == len(delays):
        raise
      _LOG.warning('%s failed (attempt %d of %d), retrying in %.1f s: %s', what,
                   attempt + 1, backoff.attempts, delays[attempt], e)
      sleep(delays[attempt])
  raise AssertionError('unreachable')


def postgres_connect(dsn: str, backoff: Backoff = Backoff()):
  """A psycopg 3 connection to ``dsn``, retried with exponential backoff."""
  import psycopg
  return with_backoff(
      lambda: psycopg.connect(dsn, connect_timeout=10), backoff, 'connecting to PostgreSQL',
      (psycopg.OperationalError,))


def postgres_aggregates_ddl(table: str):
  from psycopg import sql
  return sql.SQL("""
CREATE TABLE IF NOT EXISTS {table} (
  customer_id    TEXT             NOT NULL,
  key            TEXT             NOT NULL,
  window_start   BIGINT           NOT NULL,
  window_size_ms BIGINT           NOT NULL,
  window_end     BIGINT           NOT NULL,
  count          BIGINT           NOT NULL,
  sum            DOUBLE PRECISION NOT NULL,
  min            DOUBLE PRECISION NOT NULL,
  max            DOUBLE PRECISION NOT NULL,
  pane_index     BIGINT           NOT NULL,
  timing         TEXT             NOT NULL,
  PRIMARY KEY ({key})
)""").format(table=sql.Identifier(table),
             key=sql.SQL(', ').join(map(sql.Identifier, AGGREGATE_KEY)))


def postgres_upsert(table: str, latest_wins: bool = False):
  """The pane-aware upsert: a row replaces the stored one only if its pane
  index is higher; with ``latest_wins``, always (the writer gets each window's
  panes in the order they fired: see ``UpsertPostgres``)."""
  from psycopg import sql
  guard = '' if latest_wins else '\nWHERE excluded.pane_index > stored.pane_index'
  return sql.SQL("""
INSERT INTO {table} AS stored ({cols}) VALUES ({params})
ON CONFLICT ({key}) DO UPDATE SET {updates}""" + guard).format(
      table=sql.Identifier(table),
      cols=sql.SQL(', ').join(map(sql.Identifier, AGGREGATE_COLUMNS)),
      params=sql.SQL(', ').join(sql.Placeholder() * len(AGGREGATE_COLUMNS)),
      key=sql.SQL(', ').join(map(sql.Identifier, AGGREGATE_KEY)),
      updates=sql.SQL(', ').join(
          sql.SQL('{c} = excluded.{c}').format(c=sql.Identifier(c)) for c in AGGREGATE_VALUES))


#: The dead-letter table's columns: the contract's, then the message's identity
#: at its source and the window size whose rule dead-lettered it.
POSTGRES_DEAD_LETTER_COLUMNS = DEAD_LETTER_COLUMNS + ('message_id', 'window_size_ms')
#: A dead letter's identity: one row per message and window size, however often
#: a restored job or a retried batch writes it.
POSTGRES_DEAD_LETTER_KEY = ('message_id', 'window_size_ms')


def postgres_dead_letters_ddl(table: str):
  from psycopg import sql
  # ``data`` is BYTEA: the payload exactly as received, even one that is not
  # UTF-8 or holds NUL (TEXT could store neither); convert_from(data, 'UTF8')
  # reads the valid ones. A table made before dead letters had an identity gets
  # its columns; its older rows (no identity) stay as they are.
  return [sql.SQL("""
CREATE TABLE IF NOT EXISTS {table} (
  id             BIGSERIAL   PRIMARY KEY,
  reason         TEXT        NOT NULL,
  source         TEXT        NOT NULL,
  data           BYTEA       NOT NULL,
  detail         TEXT        NOT NULL,
  message_id     TEXT,
  window_size_ms BIGINT,
  written_at     TIMESTAMPTZ NOT NULL DEFAULT now()
)""").format(table=sql.Identifier(table)),
          sql.SQL('ALTER TABLE {table} ADD COLUMN IF NOT EXISTS message_id TEXT, '
                  'ADD COLUMN IF NOT EXISTS window_size_ms BIGINT').format(
                      table=sql.Identifier(table)),
          sql.SQL('CREATE UNIQUE INDEX IF NOT EXISTS {index} ON {table} ({key})').format(
              index=sql.Identifier(f'{table[:50]}_message'), table=sql.Identifier(table),
              key=sql.SQL(', ').join(map(sql.Identifier, POSTGRES_DEAD_LETTER_KEY)))]


def postgres_dead_letter_insert(table: str):
  """Stores a dead letter once: a row whose identity is stored already changes nothing."""
  from psycopg import sql
  return sql.SQL(
      'INSERT INTO {table} ({cols}) VALUES ({params}) ON CONFLICT ({key}) DO NOTHING').format(
      table=sql.Identifier(table),
      cols=sql.SQL(', ').join(map(sql.Identifier, POSTGRES_DEAD_LETTER_COLUMNS)),
      params=sql.SQL(', ').join(sql.Placeholder() * len(POSTGRES_DEAD_LETTER_COLUMNS)),
      key=sql.SQL(', ').join(map(sql.Identifier, POSTGRES_DEAD_LETTER_KEY)))


class PostgresDeadLetterRow:
  """A dead letter as a row of POSTGRES_DEAD_LETTER_COLUMNS."""

  def __init__(self, window_size_ms: Optional[int]):
    self._window_size_ms = window_size_ms

  def __call__(self, dead: DeadLetter) -> tuple:
    return dead_letter_row(dead) + (dead.message_id, self._window_size_ms)


def _dead_letter_order(row: tuple) -> tuple:
  # batches insert in key order, so concurrent writers of one table do not deadlock
  return (row[-2] or '', row[-1] or 0)




class _PostgresBatchFn(beam.DoFn):
  """Collects a bundle's rows and writes them in one transaction
  (executemany, which psycopg 3 sends in pipeline mode), creating the table
  first if it is missing. A failed batch is retried whole on a new
  connection, which the writes' idempotence makes safe."""

  def __init__(self, dsn: str, table: str, backoff: Backoff,
               to_row: Callable[[Any], tuple], ddl: Callable, statement: Callable,
               sort_key: Optional[Callable] = None):
    self._dsn = dsn
    self._table = table
    self._backoff = backoff
    self._to_row = to_row
    self._ddl = ddl
    self._statement = statement
    self._sort_key = sort_key
    self._written = Metrics.counter('tidemark', f'postgres_rows_written_{table}')

  def setup(self):
    self._conn = None
    self._table_ready = False

  def _connection(self):
    if self._conn is None or self._conn.closed:
      self._conn = postgres_connect(self._dsn, self._backoff)
      self._table_ready = False
    if not self._table_ready:
      with self._conn.transaction(), self._conn.cursor() as cur:
        # Workers starting together would race on CREATE TABLE IF NOT EXISTS.
        cur.execute('SELECT pg_advisory_xact_lock(hashtext(%s))', (self._table,))
        ddl = self._ddl(self._table)
        for statement in ddl if isinstance(ddl, list) else [ddl]:
          cur.execute(statement)
      self._table_ready = True
    return self._conn

  def start_bundle(self):
    self._rows: List[tuple] = []

  def process(self, element) -> Iterable:
    self._rows.append(self._to_row(element))
    return ()

  def _write(self, rows: Sequence[tuple]) -> None:
    import psycopg
    try:
      conn = self._connection()
      with conn.transaction(), conn.cursor() as cur:
        cur.executemany(self._statement(self._table), rows)
    except psycopg.OperationalError:
      self._close()
      raise

  def finish_bundle(self):
    if not self._rows:
      return
    import psycopg
    rows = sorted(self._rows, key=self._sort_key) if self._sort_key else self._rows
    with_backoff(lambda: self._write(rows), self._backoff,
                 f'writing {len(rows)} rows to PostgreSQL table {self._table}',
                 (psycopg.OperationalError,))
    self._written.inc(len(rows))
    self._rows = []

  def _close(self):
    if self._conn is not None:
      try:
        self._conn.close()
      finally:
        self._conn = None

  def teardown(self):
    self._close()


def _check_postgres_args(dsn: str, table: str, backoff: Backoff) -> None:
  if not dsn:
    raise ValueError('dsn must be set')
  check_identifier(table)
  backoff.check()


class UpsertPostgres(beam.PTransform):
  """Keeps one row per ``(customer_id, key, window_start, window_size_ms)`` in
  a PostgreSQL table (created if missing): the pane with the highest index
  wins, whatever order panes arrive in; batched per bundle; connections and
  failed batches retried with exponential backoff. Returns the rows refused
  by the customer scope.

  ``in_fire_order``: the writer follows the windows with no shuffle between,
  so each window's panes reach it in the order they fired, and the row written
  last wins, whatever its pane index. That is what lets rows be written before
  the checkpoint that holds them: a checkpointing runner that restores rolls
  the windows back and fires their panes again, perhaps fewer and fuller under
  lower indices than the rolled-back history wrote; those later writes replace
  the earlier ones, and the table ends with the restored history's panes.
  """

  def __init__(self, dsn: str, table: str = 'aggregates', customer_id: Optional[str] = None,
               backoff: Backoff = Backoff(), in_fire_order: bool = False):
    super().__init__()
    _check_postgres_args(dsn, table, backoff)
    self._dsn, self._table, self._backoff = dsn, table, backoff
    self._customer_id = check_customer_id(customer_id)
    self._in_fire_order = in_fire_order

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    latest_wins = self._in_fire_order
    return scope_rows(
        aggregates, self._customer_id, f'postgres table {self._table}',
        beam.ParDo(_PostgresBatchFn(
            self._dsn, self._table, self._backoff, aggregate_row, postgres_aggregates_ddl,
            functools.partial(postgres_upsert, latest_wins=latest_wins),
            # a stable sort: a window's panes keep the order they fired in
            sort_key=row_key if latest_wins else row_lock_order)))


class WriteDeadLettersToPostgres(beam.PTransform):
  """Stores dead letters in a PostgreSQL table (created if missing), one
  transaction per bundle, each once: a row is keyed by the message's identity
  at its source and ``window_size_ms`` (the window size whose rule the writer
  stores; a message can be too late for two sizes), so a batch retried after a
  lost commit acknowledgement, or written again by a job restored from a
  checkpoint, stores nothing twice.

  With ``customer_id`` the table receives that customer's dead letters only:
  too-late events whose payload names it. A dead letter whose payload names
  another customer is refused (returned, as the aggregates writers return
  refused rows). An invalid payload names no customer one can trust, so a
  scoped writer stores none (the run's local dead_letter.jsonl keeps every
  dead letter); an unscoped writer stores them all. Returns the refused
  dead letters."""

  def __init__(self, dsn: str, table: str = 'dead_letters', customer_id: Optional[str] = None,
               backoff: Backoff = Backoff(), window_size_ms: Optional[int] = None):
    super().__init__()
    _check_postgres_args(dsn, table, backoff)
    if window_size_ms is not None and window_size_ms <= 0:
      raise ValueError(f'window_size_ms must be positive, got {window_size_ms!r}')
    self._dsn, self._table, self._backoff = dsn, table, backoff
    self._customer_id = check_customer_id(customer_id)
    self._window_size_ms = window_size_ms

  def expand(self, dead_letters: beam.PCollection[DeadLetter]):
    write = beam.ParDo(_PostgresBatchFn(
        self._dsn, self._table, self._backoff, PostgresDeadLetterRow(self._window_size_ms),
        postgres_dead_letters_ddl, postgres_dead_letter_insert, sort_key=_dead_letter_order))
    return scope_dead_letters(
        dead_letters, self._customer_id, f'postgres table {self._table}', write)
