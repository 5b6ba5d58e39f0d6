"""Writers. Aggregates are pane-aware: a stored window holds the figures of the
highest pane index seen, whatever order panes arrive in, and a retried pane
changes nothing.

Customer scope: a database writer given ``customer_id`` writes that customer's
rows only. A row of any other customer is *refused*: not written, counted in
the metric ``tidemark/foreign_rows_refused`` and returned as the writer's
output PCollection, so the caller can keep it visible (``build`` appends it to
``refused.jsonl``). One customer's run thus never writes another's rows, even
if its input carries them. Dead letters are scoped too: see
``WriteDeadLettersToPostgres``.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

# The local-file writers live in transforms.files; their names stay importable here.
from transforms.files import WriteJsonLines, WriteLatestJson, _make_parent  # noqa: F401
from transforms.model import TOO_LATE, DeadLetter, WindowAggregate
from transforms.parse import InvalidPayload, parse_payload

_LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Shared by every database writer: the row shape, the key, customer scope.

#: Columns of the aggregates table, in row order.
AGGREGATE_COLUMNS = (
    'customer_id', 'key', 'window_start', 'window_size_ms', 'window_end', 'count',
    'sum', 'min', 'max', 'pane_index', 'timing')
#: The window identity: one stored row per key.
AGGREGATE_KEY = ('customer_id', 'key', 'window_start', 'window_size_ms')
#: What a higher pane replaces.
AGGREGATE_VALUES = tuple(c for c in AGGREGATE_COLUMNS if c not in AGGREGATE_KEY)

#: Columns of the dead-letter table (contract section 4), in row order.
DEAD_LETTER_COLUMNS = ('reason', 'source', 'data', 'detail')

#: The output tag of rows a customer-scoped writer did not write.
REFUSED = 'refused'

_IDENTIFIER = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,62}$')


def check_identifier(name: str, what: str = 'table') -> str:
  """``name`` if it is a plain SQL identifier (letters, digits, ``_``, at most
  63 characters, not starting with a digit); ValueError otherwise."""
  if not isinstance(name, str) or not _IDENTIFIER.match(name):
    raise ValueError(
        f'{what} {name!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63)')
  return name


def aggregate_row(agg: WindowAggregate) -> tuple:
  """A pane as a row of AGGREGATE_COLUMNS."""
  return (
      agg.customer_id, agg.key, agg.window_start, agg.window_end - agg.window_start,
      agg.window_end, agg.count, agg.sum, agg.min, agg.max, agg.pane_index, agg.timing)


def aggregate_dict(agg: WindowAggregate) -> Dict[str, Any]:
  """A pane as ``{column: value}`` over AGGREGATE_COLUMNS."""
  return dict(zip(AGGREGATE_COLUMNS, aggregate_row(agg)))


def _row_key(row: tuple) -> tuple:
  # Every writer applies a batch in key order, so concurrent writers take row
  # locks in the same order and do not deadlock each other (a deadlock the
  # server still reports is retried like any transient error).
  return row[:len(AGGREGATE_KEY)] + (row[AGGREGATE_COLUMNS.index('pane_index')],)


class _CustomerScopeFn(beam.DoFn):
  """Passes rows of ``customer_id`` (all rows if None); others to REFUSED."""

  def __init__(self, customer_id: Optional[str], sink: str):
    self._customer_id = customer_id
    self._sink = sink
    self._refused = Metrics.counter('tidemark', 'foreign_rows_refused')

  def process(self, agg: WindowAggregate) -> Iterable:
    if self._customer_id is None or agg.customer_id == self._customer_id:
      yield agg
    else:
      self._refused.inc()
      _LOG.warning('%s is scoped to customer %r: refused a row of customer %r',
                   self._sink, self._customer_id, agg.customer_id)
      yield beam.pvalue.TaggedOutput(REFUSED, agg)


def check_customer_id(customer_id: Optional[str]) -> Optional[str]:
  if customer_id is not None and not re.match(r'^[A-Za-z0-9_.-]{1,64}$', customer_id):
    raise ValueError(f'customer_id {customer_id!r} is not a contract customer id')
  return customer_id


def _scoped(aggregates, customer_id: Optional[str], sink: str, write: beam.PTransform):
  """Applies the customer scope, then ``write`` to the accepted rows; returns
  the refused rows."""
  scoped = aggregates | 'CustomerScope' >> beam.ParDo(
      _CustomerScopeFn(customer_id, sink)).with_outputs(REFUSED, main='accepted')
  _ = scoped.accepted | 'Write' >> write
  return scoped[REFUSED]


# ---------------------------------------------------------------------------
# SQLite (local runs).

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
  PRIMARY KEY ({key})
)""".format(key=', '.join(AGGREGATE_KEY))

SQLITE_UPSERT = """
INSERT INTO aggregates ({cols}) VALUES ({marks})
ON CONFLICT ({key}) DO UPDATE SET {updates}
WHERE excluded.pane_index > aggregates.pane_index""".format(
    cols=', '.join(AGGREGATE_COLUMNS), marks=', '.join('?' * len(AGGREGATE_COLUMNS)),
    key=', '.join(AGGREGATE_KEY),
    updates=', '.join(f'{c} = excluded.{c}' for c in AGGREGATE_VALUES))


class _UpsertSqliteFn(beam.DoFn):

  def __init__(self, path: str):
    self._path = path

  def setup(self):
    _make_parent(self._path)
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
        self._conn.executemany(SQLITE_UPSERT, sorted(self._rows, key=_row_key))
      self._rows = []

  def teardown(self):
    self._conn.close()


class UpsertSqlite(beam.PTransform):
  """Keeps one row per ``(customer_id, key, window_start, window_size_ms)`` in
  a SQLite file: the pane with the highest index wins, batched per bundle.
  Returns the rows refused by the customer scope."""

  def __init__(self, path: str, customer_id: Optional[str] = None):
    super().__init__()
    if not path:
      raise ValueError('path must be set')
    self._path = path
    self._customer_id = check_customer_id(customer_id)

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return _scoped(aggregates, self._customer_id, f'sqlite:{self._path}',
                   beam.ParDo(_UpsertSqliteFn(self._path)))


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


def postgres_upsert(table: str):
  """The pane-aware upsert: a row replaces the stored one only if its pane
  index is higher."""
  from psycopg import sql
  return sql.SQL("""
INSERT INTO {table} AS stored ({cols}) VALUES ({params})
ON CONFLICT ({key}) DO UPDATE SET {updates}
WHERE excluded.pane_index > stored.pane_index""").format(
      table=sql.Identifier(table),
      cols=sql.SQL(', ').join(map(sql.Identifier, AGGREGATE_COLUMNS)),
      params=sql.SQL(', ').join(sql.Placeholder() * len(AGGREGATE_COLUMNS)),
      key=sql.SQL(', ').join(map(sql.Identifier, AGGREGATE_KEY)),
      updates=sql.SQL(', ').join(
          sql.SQL('{c} = excluded.{c}').format(c=sql.Identifier(c)) for c in AGGREGATE_VALUES))


def postgres_dead_letters_ddl(table: str):
  from psycopg import sql
  # ``data`` is BYTEA: the payload exactly as received, even one that is not
  # UTF-8 or holds NUL (TEXT could store neither); convert_from(data, 'UTF8')
  # reads the valid ones.
  return sql.SQL("""
CREATE TABLE IF NOT EXISTS {table} (
  id         BIGSERIAL   PRIMARY KEY,
  reason     TEXT        NOT NULL,
  source     TEXT        NOT NULL,
  data       BYTEA       NOT NULL,
  detail     TEXT        NOT NULL,
  written_at TIMESTAMPTZ NOT NULL DEFAULT now()
)""").format(table=sql.Identifier(table))


def postgres_dead_letter_insert(table: str):
  from psycopg import sql
  return sql.SQL('INSERT INTO {table} ({cols}) VALUES ({params})').format(
      table=sql.Identifier(table),
      cols=sql.SQL(', ').join(map(sql.Identifier, DEAD_LETTER_COLUMNS)),
      params=sql.SQL(', ').join(sql.Placeholder() * len(DEAD_LETTER_COLUMNS)))


def dead_letter_row(dead: DeadLetter) -> tuple:
  """A dead letter as a row of DEAD_LETTER_COLUMNS, ``data`` as the payload's
  bytes (lone surrogates kept, as the sources read them)."""
  return (dead.reason, dead.source, dead.data.encode('utf-8', 'surrogatepass'), dead.detail)


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
        cur.execute(self._ddl(self._table))
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
  by the customer scope."""

  def __init__(self, dsn: str, table: str = 'aggregates', customer_id: Optional[str] = None,
               backoff: Backoff = Backoff()):
    super().__init__()
    _check_postgres_args(dsn, table, backoff)
    self._dsn, self._table, self._backoff = dsn, table, backoff
    self._customer_id = check_customer_id(customer_id)

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return _scoped(
        aggregates, self._customer_id, f'postgres table {self._table}',
        beam.ParDo(_PostgresBatchFn(
            self._dsn, self._table, self._backoff, aggregate_row, postgres_aggregates_ddl,
            postgres_upsert, sort_key=_row_key)))


def dead_letter_customer(dead: DeadLetter) -> Optional[str]:
  """The customer a dead letter belongs to: the one its payload names if the
  payload is valid (a too-late event's is). None for an invalid payload, which
  names no customer one can trust."""
  if dead.reason != TOO_LATE:
    return None
  try:
    return parse_payload(dead.data)[1]
  except InvalidPayload:
    return None


class _ScopeDeadLettersFn(beam.DoFn):
  """Passes the dead letters of ``customer_id``; those of other customers go
  to REFUSED, invalid payloads nowhere. One log line per bundle sums up what
  was kept out of the table."""

  def __init__(self, customer_id: str, sink: str):
    self._customer_id = customer_id
    self._sink = sink
    self._refused = Metrics.counter('tidemark', 'foreign_dead_letters_refused')
    self._unowned = Metrics.counter('tidemark', 'invalid_dead_letters_not_stored')

  def start_bundle(self):
    self._foreign: Dict[str, int] = {}
    self._invalid = 0

  def process(self, dead: DeadLetter) -> Iterable:
    customer = dead_letter_customer(dead)
    if customer == self._customer_id:
      yield dead
    elif customer is None:
      self._invalid += 1
      self._unowned.inc()
    else:
      self._foreign[customer] = self._foreign.get(customer, 0) + 1
      self._refused.inc()
      yield beam.pvalue.TaggedOutput(REFUSED, dead)

  def finish_bundle(self):
    if self._foreign or self._invalid:
      _LOG.warning(
          '%s is scoped to customer %r: refused %d dead letters of other customers (%s) and '
          'kept %d invalid payloads out of it (they are in dead_letter.jsonl)', self._sink,
          self._customer_id, sum(self._foreign.values()),
          ', '.join(f'{c}: {n}' for c, n in sorted(self._foreign.items())) or 'none',
          self._invalid)


class WriteDeadLettersToPostgres(beam.PTransform):
  """Appends dead letters to a PostgreSQL table (created if missing), one
  transaction per bundle. At least once: a batch retried after a lost commit
  acknowledgement can store a dead letter twice.

  With ``customer_id`` the table receives that customer's dead letters only:
  too-late events whose payload names it. A dead letter whose payload names
  another customer is refused (returned, as the aggregates writers return
  refused rows). An invalid payload names no customer one can trust, so a
  scoped writer stores none (the run's local dead_letter.jsonl keeps every
  dead letter); an unscoped writer stores them all. Returns the refused
  dead letters."""

  def __init__(self, dsn: str, table: str = 'dead_letters', customer_id: Optional[str] = None,
               backoff: Backoff = Backoff()):
    super().__init__()
    _check_postgres_args(dsn, table, backoff)
    self._dsn, self._table, self._backoff = dsn, table, backoff
    self._customer_id = check_customer_id(customer_id)

  def expand(self, dead_letters: beam.PCollection[DeadLetter]):
    write = beam.ParDo(_PostgresBatchFn(
        self._dsn, self._table, self._backoff, dead_letter_row, postgres_dead_letters_ddl,
        postgres_dead_letter_insert))
    if self._customer_id is None:
      _ = dead_letters | 'Append' >> write
      return dead_letters | 'NoneRefused' >> beam.Filter(lambda _: False)
    scoped = dead_letters | 'CustomerScope' >> beam.ParDo(_ScopeDeadLettersFn(
        self._customer_id, f'postgres table {self._table}')).with_outputs(REFUSED, main='accepted')
    _ = scoped.accepted | 'Append' >> write
    return scoped[REFUSED]


# ---------------------------------------------------------------------------
# BigQuery (Dataflow production). Writes go through the Storage Write API,
# whose Java transform Beam expands at construction time (expansion_service:
# host:port of a running one; default: Beam starts its GCP expansion jar).

def _bq_fields(columns: Sequence[str], types: Dict[str, str]) -> List[Dict[str, str]]:
  return [{'name': c, 'type': types[c], 'mode': 'REQUIRED'} for c in columns]


#: The aggregates table: AGGREGATE_COLUMNS, primary key AGGREGATE_KEY.
AGGREGATES_BQ_SCHEMA = {'fields': _bq_fields(AGGREGATE_COLUMNS, {
    'customer_id': 'STRING', 'key': 'STRING', 'window_start': 'INT64',
    'window_size_ms': 'INT64', 'window_end': 'INT64', 'count': 'INT64', 'sum': 'FLOAT64',
    'min': 'FLOAT64', 'max': 'FLOAT64', 'pane_index': 'INT64', 'timing': 'STRING'})}

#: The dead-letter table; ``data`` is BYTES (the payload exactly, as in PostgreSQL).
DEAD_LETTERS_BQ_SCHEMA = {'fields': _bq_fields(DEAD_LETTER_COLUMNS, {
    'reason': 'STRING', 'source': 'STRING', 'data': 'BYTES', 'detail': 'STRING'})}

#: What the CDC (upsert) write receives: the row plus its mutation info.
AGGREGATES_BQ_CDC_SCHEMA = {'fields': [
    {'name': 'row_mutation_info', 'type': 'STRUCT', 'mode': 'REQUIRED', 'fields': [
        {'name': 'mutation_type', 'type': 'STRING', 'mode': 'REQUIRED'},
        {'name': 'change_sequence_number', 'type': 'STRING', 'mode': 'REQUIRED'}]},
    {'name': 'record', 'type': 'STRUCT', 'mode': 'REQUIRED',
     'fields': AGGREGATES_BQ_SCHEMA['fields']},
]}

#: The dead-letter reason of a row BigQuery refused.
BIGQUERY_WRITE_FAILED = 'bigquery_write_failed'

_BQ_TABLE = re.compile(
    r'^(?:(?P<project>[a-z][a-z0-9-]{4,28}[a-z0-9])[:.])?'
    r'(?P<dataset>[A-Za-z0-9_]{1,1024})\.(?P<table>[A-Za-z0-9_-]{1,1024})$')


def check_bigquery_table(spec: str, what: str = 'table') -> str:
  """``spec`` if it is ``[PROJECT:]DATASET.TABLE`` (or ``PROJECT.DATASET.TABLE``)."""
  if not isinstance(spec, str) or not _BQ_TABLE.match(spec):
    raise ValueError(f'{what} {spec!r} is not [PROJECT:]DATASET.TABLE')
  return spec


def bigquery_cdc_row(agg: WindowAggregate) -> Dict[str, Any]:
  """A pane as a BigQuery CDC UPSERT whose change sequence number is the pane
  index (hex, as BigQuery wants): BigQuery keeps, per primary key, the row with
  the highest one, which is the pane-aware rule; a retried pane is a no-op."""
  return {
      'row_mutation_info': {
          'mutation_type': 'UPSERT', 'change_sequence_number': format(agg.pane_index, 'X')},
      'record': aggregate_dict(agg),
  }


def bigquery_dead_letter_row(dead: DeadLetter) -> Dict[str, Any]:
  return dict(zip(DEAD_LETTER_COLUMNS, dead_letter_row(dead)))


def bigquery_failed_row(table: str, failed: Dict[str, Any]) -> Dict[str, Any]:
  """A row the aggregates write failed (``{'error_message', 'failed_row'}``)
  as a dead-letter row carrying the row as JSON and BigQuery's error."""
  row = failed['failed_row']
  row = row.get('record', row) if isinstance(row, dict) else row
  return bigquery_dead_letter_row(DeadLetter(
      BIGQUERY_WRITE_FAILED, f'bigquery:{table}',
      json.dumps(row, sort_keys=True, separators=(',', ':'), default=str),
      str(failed.get('error_message') or 'rejected by BigQuery')))


def _storage_write(table: str, schema: dict, expansion_service: Optional[str], **kwargs):
  from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
  return WriteToBigQuery(
      table, schema=schema, method=WriteToBigQuery.Method.STORAGE_WRITE_API,
      create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
      write_disposition=BigQueryDisposition.WRITE_APPEND,
      expansion_service=expansion_service, **kwargs)


class _UpsertBigQuery(beam.PTransform):

  def __init__(self, sink: 'WriteAggregatesToBigQuery'):
    super().__init__()
    self._sink = sink

  def expand(self, aggregates):
    result = (
        aggregates
        | 'ToCdcRow' >> beam.Map(bigquery_cdc_row)
        | 'Upsert' >> self._sink.aggregates_write())
    table = self._sink.table
    return (
        result.failed_rows_with_errors
        | 'FailedToDeadLetter' >> beam.Map(lambda failed: bigquery_failed_row(table, failed))
        | 'WriteFailed' >> self._sink.dead_letters_write())


class WriteAggregatesToBigQuery(beam.PTransform):
  """Upserts panes into a BigQuery table with the Storage Write API (CDC
  UPSERT, primary key AGGREGATE_KEY, sequence number = pane index, so the
  highest pane wins as in every other sink); rows BigQuery refuses go to
  ``dead_letter_table``. Returns the rows refused by the customer scope."""

  def __init__(self, table: str, dead_letter_table: str, customer_id: Optional[str] = None,
               expansion_service: Optional[str] = None):
    super().__init__()
    self.table = check_bigquery_table(table)
    self.dead_letter_table = check_bigquery_table(dead_letter_table, 'dead_letter_table')
    if self.table == self.dead_letter_table:
      raise ValueError('table and dead_letter_table must differ')
    self.customer_id = check_customer_id(customer_id)
    self.expansion_service = expansion_service

  def aggregates_write(self):
    # CDC writes need at-least-once streams; the upsert makes them exact.
    return _storage_write(
        self.table, AGGREGATES_BQ_CDC_SCHEMA, self.expansion_service, use_cdc_writes=True,
        primary_key=list(AGGREGATE_KEY), use_at_least_once=True)

  def dead_letters_write(self):
    return _storage_write(self.dead_letter_table, DEAD_LETTERS_BQ_SCHEMA,
                          self.expansion_service)

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return _scoped(aggregates, self.customer_id, f'bigquery:{self.table}',
                   _UpsertBigQuery(self))


class WriteDeadLettersToBigQuery(beam.PTransform):
  """Appends dead letters to a BigQuery table with the Storage Write API."""

  def __init__(self, table: str, expansion_service: Optional[str] = None):
    super().__init__()
    self.table = check_bigquery_table(table)
    self.expansion_service = expansion_service

  def write(self):
    return _storage_write(self.table, DEAD_LETTERS_BQ_SCHEMA, self.expansion_service)

  def expand(self, dead_letters: beam.PCollection[DeadLetter]):
    return (
        dead_letters
        | 'ToRow' >> beam.Map(bigquery_dead_letter_row)
        | 'Append' >> self.write())


# ---------------------------------------------------------------------------
# Topics: every emitted pane, for downstream consumers.
#
# A topic of aggregates is a PANE LOG, not a table: it carries every pane of a
# window (EARLY, ON_TIME, LATE), each as the JSON object of contract section 4,
# and may carry a pane twice (a retried bundle publishes again). A consumer
# keeps, per (customer_id, key, window_start, window_end), the record with the
# highest pane_index, which is the pane-aware rule of the database writers;
# panes of one customer arrive in order on Kafka (one key, one partition) but a
# consumer must not rely on it.

#: How long finish_bundle waits for the broker to acknowledge a bundle.
PUBLISH_TIMEOUT_S = 120.0

_PUBSUB_TOPIC = re.compile(
    r'^projects/[a-z][a-z0-9-]{4,28}[a-z0-9]/topics/[A-Za-z][A-Za-z0-9._~+%-]{2,254}$')
_KAFKA_TOPIC = re.compile(r'^[A-Za-z0-9._-]{1,249}$')


def aggregate_json(agg: WindowAggregate) -> bytes:
  """A pane as the UTF-8 JSON object of contract section 4."""
  return json.dumps(agg.to_json_dict(), separators=(',', ':'), allow_nan=False).encode('utf-8')


def check_pubsub_topic(path: str) -> str:
  """``path`` if it is ``projects/PROJECT/topics/TOPIC``; ValueError otherwise."""
  if not isinstance(path, str) or not _PUBSUB_TOPIC.match(path):
    raise ValueError(f'{path!r} is not projects/PROJECT/topics/TOPIC')
  return path


def check_kafka_topic(topic: str) -> str:
  if not isinstance(topic, str) or not _KAFKA_TOPIC.match(topic) or topic in ('.', '..'):
    raise ValueError(f'Kafka topic {topic!r} is not 1-249 characters of A-Z a-z 0-9 . _ -')
  return topic


class _PublishKafkaFn(beam.DoFn):
  """Produces each pane keyed by its customer, record time ``window_end - 1``
  (the window's last millisecond); a bundle ends only once the broker
  acknowledged all of it, else it fails and is retried."""

  def __init__(self, bootstrap: str, topic: str, timeout_s: float):
    self._bootstrap = bootstrap
    self._topic = topic
    self._timeout_s = timeout_s
    self._published = Metrics.counter('tidemark', 'kafka_panes_published')

  def setup(self):
    from confluent_kafka import Producer
    self._producer = Producer({
        'bootstrap.servers': self._bootstrap,
        'enable.idempotence': True,  # acks=all, no duplicates from the client's retries
        'linger.ms': 20,
    })

  def start_bundle(self):
    self._failures: List[str] = []
    self._pending = 0

  def _delivered(self, err, msg) -> None:
    if err is not None:
      self._failures.append(f'{msg.key()!r} at {msg.timestamp()[1]}: {err}')

  def process(self, agg: WindowAggregate) -> Iterable:
    while True:
      try:
        self._producer.produce(
            self._topic, key=agg.customer_id.encode('utf-8'), value=aggregate_json(agg),
            timestamp=agg.window_end - 1, on_delivery=self._delivered)
        break
      except BufferError:  # the local queue is full: let deliveries drain it
        self._producer.poll(0.5)
    self._pending += 1
    self._producer.poll(0)
    return ()

  def finish_bundle(self):
    if not self._pending:
      return
    left = self._producer.flush(self._timeout_s)
    if left:
      raise RuntimeError(
          f'Kafka topic {self._topic}: {left} panes not acknowledged within {self._timeout_s} s')
    if self._failures:
      raise RuntimeError(
          f'Kafka topic {self._topic}: {len(self._failures)} of {self._pending} panes '
          f'failed: {self._failures[:5]}')
    self._published.inc(self._pending)
    self._pending = 0

  def teardown(self):
    producer = getattr(self, '_producer', None)
    if producer is not None:
      producer.flush(5)


class PublishAggregatesToKafka(beam.PTransform):
  """Publishes every pane to a Kafka topic (a pane log: see above), record key
  the customer id (UTF-8), value the pane's JSON, record timestamp
  ``window_end - 1`` ms. At least once; a failed delivery fails the bundle."""

  def __init__(self, bootstrap: str, topic: str, timeout_s: float = PUBLISH_TIMEOUT_S):
    super().__init__()
    if not bootstrap:
      raise ValueError('bootstrap must be set')
    self._bootstrap = bootstrap
    self._topic = check_kafka_topic(topic)
    self._timeout_s = timeout_s

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return aggregates | 'Publish' >> beam.ParDo(
        _PublishKafkaFn(self._bootstrap, self._topic, self._timeout_s))


class _PublishPubSubFn(beam.DoFn):
  """Publishes each pane with attributes customer_id, pane_index and
  window_start; a bundle ends only once every publish succeeded."""

  def __init__(self, topic_path: str, timeout_s: float):
    self._topic_path = topic_path
    self._timeout_s = timeout_s
    self._published = Metrics.counter('tidemark', 'pubsub_panes_published')

  def setup(self):
    from google.cloud import pubsub_v1
    self._publisher = pubsub_v1.PublisherClient()

  def start_bundle(self):
    self._futures: List[Any] = []

  def process(self, agg: WindowAggregate) -> Iterable:
    self._futures.append(self._publisher.publish(
        self._topic_path, aggregate_json(agg), customer_id=agg.customer_id,
        pane_index=str(agg.pane_index), window_start=str(agg.window_start)))
    return ()

  def finish_bundle(self):
    futures, self._futures = self._futures, []
    for future in futures:
      future.result(timeout=self._timeout_s)  # raises the publish error
    self._published.inc(len(futures))

  def teardown(self):
    publisher = getattr(self, '_publisher', None)
    if publisher is not None:
      publisher.stop()


class PublishAggregatesToPubSub(beam.PTransform):
  """Publishes every pane to a Pub/Sub topic (a pane log: see above), data the
  pane's JSON, attributes ``customer_id``, ``pane_index``, ``window_start``.
  At least once; a failed publish fails the bundle."""

  def __init__(self, topic_path: str, timeout_s: float = PUBLISH_TIMEOUT_S):
    super().__init__()
    self._topic_path = check_pubsub_topic(topic_path)
    self._timeout_s = timeout_s

  def expand(self, aggregates: beam.PCollection[WindowAggregate]):
    return aggregates | 'Publish' >> beam.ParDo(
        _PublishPubSubFn(self._topic_path, self._timeout_s))
