"""Writers. Aggregates are pane-aware: a stored window holds the figures of the
highest pane index seen, whatever order panes arrive in, and a retried pane
changes nothing.

Customer scope: a database writer given ``customer_id`` writes that customer's
rows only. A row of any other customer is *refused*: not written, counted in
the metric ``tidemark/foreign_rows_refused`` and returned as the writer's
output PCollection, so the caller can keep it visible (``build`` appends it to
``refused.jsonl``). One customer's run thus never writes another's rows, even
if its input carries them. Dead letters are scoped too: see
``transforms.connectors.postgres.WriteDeadLettersToPostgres``. The writers of each
system live in their own modules: ``transforms.connectors.postgres``, ``transforms.connectors.bigquery``,
``transforms.connectors.topics`` (and the output files in ``transforms.connectors.writers``).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from typing import Any, Dict, Iterable, List, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.connectors.writers import make_parent
from transforms.rules.model import (
    TOO_LATE, DeadLetter, WindowAggregate, is_customer_id, payload_bytes)
from transforms.rules.payload import InvalidPayload, parse_payload

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


def row_key(row: tuple) -> tuple:
  """A row's window identity (AGGREGATE_KEY). Every writer applies a batch in
  key order, so concurrent writers take row locks in the same order and do not
  deadlock each other (a deadlock the server still reports is retried like any
  transient error)."""
  return row[:len(AGGREGATE_KEY)]


def row_lock_order(row: tuple) -> tuple:
  """``row_key``, then the pane index."""
  return row_key(row) + (row[AGGREGATE_COLUMNS.index('pane_index')],)


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
  """``customer_id`` if it is None or a contract customer id
  (``transforms.rules.model.is_customer_id``); ValueError otherwise."""
  if customer_id is not None and not is_customer_id(customer_id):
    raise ValueError(f'customer_id {customer_id!r} is not a contract customer id')
  return customer_id


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


def scope_dead_letters(dead_letters, customer_id: Optional[str], sink: str,
                       write: beam.PTransform):
  """Applies the customer scope to dead letters, then ``write`` to the kept
  ones; returns the refused ones (other customers'). Unscoped (``customer_id``
  None), every dead letter is written and none refused."""
  if customer_id is None:
    _ = dead_letters | 'Append' >> write
    return dead_letters | 'NoneRefused' >> beam.Filter(lambda _: False)
  scoped = dead_letters | 'CustomerScope' >> beam.ParDo(_ScopeDeadLettersFn(
      customer_id, sink)).with_outputs(REFUSED, main='accepted')
  _ = scoped.accepted | 'Append' >> write
  return scoped[REFUSED]


def scope_rows(aggregates, customer_id: Optional[str], sink: str, write: beam.PTransform):
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
    make_parent(self._path)
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
        self._conn.executemany(SQLITE_UPSERT, sorted(self._rows, key=row_lock_order))
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
    return scope_rows(aggregates, self._customer_id, f'sqlite:{self._path}',
                   beam.ParDo(_UpsertSqliteFn(self._path)))

def dead_letter_row(dead: DeadLetter) -> tuple:
  """A dead letter as a row of DEAD_LETTER_COLUMNS, ``data`` as the payload's
  exact bytes (``model.payload_bytes``)."""
  return (dead.reason, dead.source, payload_bytes(dead.data), dead.detail)
