"""BigQuery writers (Dataflow production), scoped like every database writer
(see transforms.connectors.sinks)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, List, Optional, Sequence

import apache_beam as beam

from transforms.rules.model import DeadLetter, WindowAggregate
from transforms.connectors.sinks import (
    AGGREGATE_COLUMNS, AGGREGATE_KEY, DEAD_LETTER_COLUMNS, scope_rows, aggregate_dict,
    check_customer_id, dead_letter_row, scope_dead_letters)

_LOG = logging.getLogger(__name__)

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
    return scope_rows(aggregates, self.customer_id, f'bigquery:{self.table}',
                   _UpsertBigQuery(self))


class _DeadLetterRowsToBigQuery(beam.PTransform):

  def __init__(self, sink: 'WriteDeadLettersToBigQuery'):
    super().__init__()
    self._sink = sink

  def expand(self, dead_letters):
    return (dead_letters
            | 'ToRow' >> beam.Map(bigquery_dead_letter_row)
            | 'Write' >> self._sink.write())


class WriteDeadLettersToBigQuery(beam.PTransform):
  """Appends dead letters to a BigQuery table with the Storage Write API.

  Scoped to ``customer_id`` as the PostgreSQL writer is (``sinks.scope_dead_letters``):
  that customer's too-late events only; others' refused (returned), invalid
  payloads kept out (dead_letter.jsonl has every one). Returns the refused."""

  def __init__(self, table: str, expansion_service: Optional[str] = None,
               customer_id: Optional[str] = None):
    super().__init__()
    self.table = check_bigquery_table(table)
    self.expansion_service = expansion_service
    self.customer_id = check_customer_id(customer_id)

  def write(self):
    return _storage_write(self.table, DEAD_LETTERS_BQ_SCHEMA, self.expansion_service)

  def expand(self, dead_letters: beam.PCollection[DeadLetter]):
    return scope_dead_letters(dead_letters, self.customer_id, f'bigquery:{self.table}',
                              _DeadLetterRowsToBigQuery(self))
